"""The frontend (API server) process: tokenizer, detokenizer, the client server and the core link."""
