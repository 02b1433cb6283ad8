"""The worker: talks to a broker (:mod:`.manager`) and runs jobs in a process pool (:mod:`.pool`)."""
