"""The manager's end of the link: websocket transport, join and auth, hub sessions."""
