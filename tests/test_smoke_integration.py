import smtplib


def test_message_to_accepted_domain_lands_in_drop_folder(start_server):
    server = start_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        refused = client.sendmail("alice@sender.test", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    assert refused == {}
    files = server.wait_for(server.drop_files, what="a drop file")
    with open(files[0], "rb") as f:
        data = f.read()
    assert data.startswith(b"X-Sender: <alice@sender.test>\r\nX-Receiver: <bob@example.com>\r\nReceived: ")
    assert data.endswith(b"Subject: hi\r\n\r\nhello\r\n")
