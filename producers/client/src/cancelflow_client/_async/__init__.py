"""The asyncio client (the blocking one is generated from it)."""
