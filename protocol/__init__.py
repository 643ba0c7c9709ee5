"""The vocabulary shared by every zeroserve process: messages, config, codec, errors, process helpers.

It imports msgspec, pyzmq, numpy and the standard library only, never torch or transformers.
"""
