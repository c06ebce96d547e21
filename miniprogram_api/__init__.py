"""The Sanic HTTP API of the Linli mini-program."""
