"""Cloud sync: the outbox relay (MQTT brokers or a local file sink), its link and its CLI.

Nothing here is imported by `import gateway`: the daemon loads `gateway.sync.service` only
when the configuration has a `[sync]` section, and aiomqtt only when an MQTT link starts.
"""
