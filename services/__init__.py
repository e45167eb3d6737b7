"""In-process services run by the supervisor: devices, collection (and more to come)."""
