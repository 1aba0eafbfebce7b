"""
The management room: what admins use to see and steer a running server.

api.py      the HTTP/JSON endpoint (twisted.web): status, queues, messages,
            their actions, reload, /metrics, the queue viewer page
service.py  where the endpoint listens: a UNIX socket (mode 0600), and TCP
            only with a bearer token
client.py   the command line's side: the same endpoint over the UNIX socket
commands.py the command line's verbs (queue list/flush, reload, status)
viewer.py   the queue viewer page (viewer.html), served at GET /
"""
