"""The worker: talks to a broker (:mod:`.manager`), runs jobs in processes (:mod:`.pool`)."""
