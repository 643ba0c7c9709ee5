"""The core: scheduler, KV block pool, request table and utility calls, in one process."""
