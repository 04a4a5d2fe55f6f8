"""Local tooling around the data path: the embedded stack (broker + Redis) of the demo and the
tests, the demo itself, the producer of sample conversations, the reference indexer and its
search client. Nothing here runs inside a production worker."""
