"""The three listeners (outbound 15001, inbound HBONE 15008, inbound plaintext 15006) and the pure
routing decision they share."""
