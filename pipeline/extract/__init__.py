"""The extract stage: listing, plan, driver, actor, worker, decode, progress."""
