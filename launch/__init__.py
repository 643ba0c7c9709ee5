"""`zeroserve serve`: start core, workers and frontends, watch them, stop them all."""
