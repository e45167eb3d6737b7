"""What the tests share: peers started and stopped by PID (peers.py), gatewayd as a process
(daemon.py), Mosquitto (mqtt.py), libcoap's client and the CoAP front door (coap.py), config
issues (config.py), bounded waiting (wait.py), stores filled before a daemon runs
(store.py), and which tests start a process, so they are marked `slow` (slow.py). Fixtures
stay in conftest files; tests import helpers from here, never from a conftest."""
