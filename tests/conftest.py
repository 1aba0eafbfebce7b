import pytest

from harness import Server, config_text, free_port


@pytest.fixture
def start_server(tmp_path):
    """start_server(config=None, **config_text_knobs) -> a running Server."""
    started = []

    def start(config: str | None = None, **knobs) -> Server:
        port = free_port()
        text = config.format(port=port) if config else config_text(port, **knobs)
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        server = Server(workdir, text, port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
