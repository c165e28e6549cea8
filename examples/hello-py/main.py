"""A sample Sequence: greets each input line, counts them, answers events.

Run it (see the README's walk-through):
    si seq deploy examples/hello-py --args '["Hello"]'
    echo -e "Alice\nBob" | si inst input - -t text/plain -e
    si inst output -
"""

import asyncio


async def run(context, input, greeting="Hello", *args):
    context.logger.info("hello-py started with greeting %r", greeting)
    count = 0
    context.on("ping", lambda message: context.emit("pong", {"lines": count, "got": message}))

    async def on_stop(timeout, can_keep_alive):
        context.logger.info("stopping after %d lines", count)

    context.set_stop_handler(on_stop)
    async for line in input:
        count += 1
        yield f"{greeting}, {line.strip()}! (#{count})\n"
        await asyncio.sleep(0)
