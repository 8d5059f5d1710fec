"""A real llama.cpp llama-server for the tests: built by build.sh, started by server.py."""
