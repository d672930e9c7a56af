"""gRPC metadata keys shared by the server and the clients."""

# The session a call belongs to, for load balancers that keep a session on one pod
# (consistent hash on this header: deploy/k8s/routing). Clients send it on every
# session-bound call; the server refuses a call whose header and body disagree.
SESSION_HEADER = "x-rnnserve-session"
