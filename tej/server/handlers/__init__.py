"""The request handlers, one module per group of operations (see tej.protocol.OPERATIONS).

Each module ends with HANDLERS, its operations' names and functions. A handler
takes the connection (tej.server.service.Connection) and the request's
arguments, and returns plain data; it raises AgentError for what the client
should hear of.
"""
