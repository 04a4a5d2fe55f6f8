"""Developer tooling, not installed with the package: the local stack (a real Kafka-protocol
broker and a real Redis on loopback), the demo, and the test harness's fault injection.

Nothing on the data path imports it; the CLI loads it lazily for `evostream stack` and
`evostream demo`, which therefore run from a source checkout.
"""
