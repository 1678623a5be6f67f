"""Protocol-faithful test doubles (aiohttp servers) for the remote adapters."""
