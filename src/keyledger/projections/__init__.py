"""Read models built from the event stream: catalog, audit log and key inventory.

The same projection code runs inline (inside the transaction that appends the events, so
callers read their own writes and counts are exact across processes) and in a rebuild
(replaying the stream from the first event).
"""
