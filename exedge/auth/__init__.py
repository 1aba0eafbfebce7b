"""
The auth room: who the peer is and what it may do. This issue covers the
rights that follow from the connector and the peer's address; AUTH and TLS
identities join them in a later issue.
"""
