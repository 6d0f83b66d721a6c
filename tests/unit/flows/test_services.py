"""flows/services.py: the PostgreSQL password file."""


def test_a_password_file_is_private_from_its_first_byte(tmp_path, monkeypatch):
    import os
    import stat

    from flows import services

    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, mode=0o777: opened.append(mode) or real_open(path, flags, mode))
    services._write_private(tmp_path / "password", "s3cret\n")
    assert opened == [0o600]  # created with its final mode: no window with the umask's
    assert stat.S_IMODE((tmp_path / "password").stat().st_mode) == 0o600
    assert (tmp_path / "password").read_text() == "s3cret\n"
