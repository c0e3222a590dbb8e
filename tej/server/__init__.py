"""tej's code on the server (see tej/remote_agent.py and docs/architecture.md)."""
