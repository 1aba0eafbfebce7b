"""
The load the kill -9 tests send: threads, each on one connection (a new
one after an error), sending messages that carry a token, counted as
acknowledged (250 seen) or failed; and what reached the drop directory,
by token. Shared by test_crash_safety and test_receive_workers.
"""

import os
import re
import smtplib
import threading

TOKEN = re.compile(rb"X-Test-Token: (\S+)\r\n")


def body(token: str, subject: str = "crash test", lines: int = 60) -> bytes:
    """A message that says its token at the top and at its very end (a truncated copy shows)."""
    filler = b"".join(b"line %d of the body of %s\r\n" % (i, token.encode()) for i in range(lines))
    return b"X-Test-Token: %s\r\nSubject: %s\r\n\r\n%sEND-OF-%s\r\n" % (
        token.encode(), subject.encode(), filler, token.encode())


def sender(port, tokens, acked, failed, lock, stop, *, mail_from="sender@crash.test", subject="crash test",
           lines=60, timeout=10):
    client = None
    for token in tokens:
        if stop.is_set():
            with lock:
                failed.add(token)
            continue
        try:
            if client is None:
                client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
            client.sendmail(mail_from, ["rcpt@example.com"], body(token, subject, lines))
            with lock:
                acked.add(token)
        except (OSError, smtplib.SMTPException):
            with lock:
                failed.add(token)
            client = None         # a new connection (with workers: another worker, or the replacement)
    if client is not None:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            pass


def start_senders(port, tokens, connections: int = 10, **options):
    """C{connections} threads sending C{tokens}; (threads, acked, failed, stop)."""
    acked, failed = set(), set()
    lock, stop = threading.Lock(), threading.Event()
    threads = [threading.Thread(target=sender, args=(port, tokens[i::connections], acked, failed, lock, stop),
                                kwargs=options)
               for i in range(connections)]
    for t in threads:
        t.start()
    return threads, acked, failed, stop


def delivered(server) -> dict[str, int]:
    """Token -> how many times it is in the drop directory, once the spool has drained; every file whole."""
    queue_dir = server.path("var", "spool", "queue")
    server.wait_for(lambda: not os.listdir(queue_dir), timeout=30, what="the spool to drain")
    seen: dict[str, int] = {}
    for path in server.drop_files():
        with open(path, "rb") as f:
            data = f.read()
        m = TOKEN.search(data)
        assert m, f"{path} has no token: a partial or foreign message"
        token = m.group(1).decode()
        assert data.endswith(b"END-OF-%s\r\n" % token.encode()), f"{path} is truncated"
        seen[token] = seen.get(token, 0) + 1
    return seen
