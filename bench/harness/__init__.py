"""What every benchmark and the soak share: start a server (servers), stream a request over gRPC (streams),
sample a process (processes), run a closed loop of clients (loops)."""
