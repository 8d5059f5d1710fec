"""Translators between other protocols (Anthropic Messages, Gemini) and OpenAI chat completions.

Pure modules: values in, values out. The byte-for-byte OpenAI path never imports them.
"""
