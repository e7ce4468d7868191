"""The facade's Sanic config: the settings read per request as properties still behave as Sanic's items."""

from __future__ import annotations

from sanic.config import Config

from rest_facade.app import _Settings


def test_the_properties_are_the_items() -> None:
    config = _Settings()
    assert config.KEEP_ALIVE is Config().KEEP_ALIVE is True
    assert config.REQUEST_BUFFER_SIZE == Config().REQUEST_BUFFER_SIZE
    config.KEEP_ALIVE = False  # as RestServer.not_ready sets it
    assert config.KEEP_ALIVE is False and config["KEEP_ALIVE"] is False
    config.update({"KEEP_ALIVE": True, "REQUEST_BUFFER_SIZE": 1234})
    assert config.KEEP_ALIVE is True and config["REQUEST_BUFFER_SIZE"] == config.REQUEST_BUFFER_SIZE == 1234
    assert "KEEP_ALIVE" not in vars(config)  # nothing shadows the item


def test_other_settings_are_untouched() -> None:
    config = _Settings()
    config.REQUEST_MAX_SIZE = 10
    assert config.REQUEST_MAX_SIZE == config["REQUEST_MAX_SIZE"] == 10
    assert dict(config) == {**Config(), "REQUEST_MAX_SIZE": 10}
