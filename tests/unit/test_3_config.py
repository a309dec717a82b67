"""Section 3: server.conf (INI, one table of options) and the original one-value-per-file settings.

The files live in a pyfakefs file system, at the real paths under /etc/byteback.
"""
from __future__ import annotations

import os

import pytest

import byteback
from byteback import ByteBackError

CONF_DIR = "/etc/byteback"
CONF = "/etc/byteback/server.conf"


def load(fs, text):
    fs.create_file(CONF, contents=text)
    return byteback.load_server_config(CONF_DIR)


def load_error(fs, text) -> str:
    fs.create_file(CONF, contents=text)
    with pytest.raises(ByteBackError) as exc:
        byteback.load_server_config(CONF_DIR)
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- defaults --

def test_a_missing_server_conf_gives_the_design_defaults(fs):
    fs.create_dir(CONF_DIR)
    config = byteback.load_server_config(CONF_DIR)
    assert config == byteback.ServerConfig()
    assert config.store == ""
    assert config.min_interval == 6 * 3600
    assert config.order == "importance"
    assert config.targets == (0, 1, 2, 3, 4, 5, 6, 7)      # "week": simulate's verdict
    assert config.suspicion == 3
    assert config.headroom == 1.5
    assert config.history == 10


def test_a_missing_config_dir_gives_the_defaults_too(fs):
    assert byteback.load_server_config("/nowhere/at/all") == byteback.ServerConfig()


@pytest.mark.parametrize("text", [
    "",
    "# nothing but a comment\n",
    "[server]\n",
    "[server]\n# min_interval = 1h\n; order = age\n\n",
])
def test_an_empty_or_commented_server_conf_gives_the_defaults(fs, text):
    assert load(fs, text) == byteback.ServerConfig()


def test_the_table_defaults_agree_with_the_server_config_defaults():
    # SERVER_OPTIONS (what parsing falls back to) and ServerConfig's own
    # defaults are written twice; they must say the same.
    assert byteback.parse_server_config("") == byteback.ServerConfig()


# -- each key --

@pytest.mark.parametrize("line,field,value", [
    ("store = /srv/byteback", "store", "/srv/byteback"),
    ("min_interval = 2h", "min_interval", 7200.0),
    ("min_interval = 90m", "min_interval", 5400.0),
    ("min_interval = 1d", "min_interval", 86400.0),
    ("min_interval = 3600", "min_interval", 3600.0),
    ("order = age", "order", "age"),
    ("order = importance", "order", "importance"),
    ("targets = 0, 1, 7, 28", "targets", (0.0, 1.0, 7.0, 28.0)),
    ("targets = 28 7 1 0 7", "targets", (0.0, 1.0, 7.0, 28.0)),     # sorted, no duplicates
    ("targets = 0.5,1", "targets", (0.5, 1.0)),
    ("headroom = 2", "headroom", 2.0),
    ("headroom = 1.25", "headroom", 1.25),
    ("normal_growth = 50%", "normal_growth", 0.5),
    ("share_growth = 0.05", "share_growth", 0.05),
    ("history = 5", "history", 5),
    ("history: 3", "history", 3),                                  # ':' works as in INI
    ("HISTORY = 4", "history", 4),                                 # keys are case-insensitive
    ("  history   =   7  ", "history", 7),
])
def test_each_key_sets_its_field_and_leaves_the_rest(fs, line, field, value):
    config = load(fs, f"# byteback server settings\n[server]\n{line}\n")
    assert getattr(config, field) == value
    assert config._replace(**{field: getattr(byteback.ServerConfig(), field)}) == byteback.ServerConfig()


def test_all_keys_together(fs):
    config = load(fs, "[server]\nstore = /srv/b\nmin_interval = 12h\norder = age\n"
                      "targets = 0,7\nheadroom = 3\nhistory = 20\n")
    assert (config.store, config.min_interval, config.order, config.targets,
            config.headroom, config.history) == ("/srv/b", 43200.0, "age", (0.0, 7.0), 3.0, 20)


def test_percent_signs_are_literal_no_interpolation(fs):
    config = load(fs, "[server]\nstore = /srv/100%done/%(home)s/%%\n")
    assert config.store == "/srv/100%done/%(home)s/%%"


# -- errors name the file and the line --

def test_an_unknown_key_names_the_file_the_line_and_the_known_keys(fs):
    message = load_error(fs, "# settings\n\n[server]\nmin_intervall = 6h\n")
    assert message.startswith(f"{CONF} line 4: unknown key 'min_intervall'")
    for key in ("headroom", "history", "min_interval", "order", "store", "targets"):
        assert key in message


def test_an_unknown_key_after_good_ones_gets_its_own_line(fs):
    message = load_error(fs, "[server]\nhistory = 5\norder = age\n\n# typo below\nhedroom = 2\n")
    assert message.startswith(f"{CONF} line 6: unknown key 'hedroom'")


def test_an_unknown_section_names_the_file_and_its_line(fs):
    message = load_error(fs, "[server]\nhistory = 5\n[client]\nhistory = 2\n")
    assert message == f"{CONF} line 3: unknown section [client]; put settings under [server]"


@pytest.mark.parametrize("line,key,why", [
    ("min_interval = soon", "min_interval", "is not a duration"),
    ("min_interval = -6h", "min_interval", "is not a duration"),
    ("min_interval =", "min_interval", "is not a duration"),
    ("order = random", "order", "use 'importance' or 'age'"),
    ("order = Age", "order", "use 'importance' or 'age'"),
    ("targets = a,b", "targets", "is not a list of days"),
    ("targets = -1,2", "targets", "must be 0 or more days"),
    ("targets = 1,inf", "targets", "must be 0 or more days"),
    ("targets = nan", "targets", "must be 0 or more days"),
    ("targets = ,", "targets", "the target list is empty"),
    ("headroom = 0", "headroom", "greater than 0"),
    ("headroom = -1", "headroom", "greater than 0"),
    ("headroom = inf", "headroom", "greater than 0"),
    ("headroom = nan", "headroom", "greater than 0"),
    ("headroom = lots", "headroom", "could not convert"),
    ("history = 0", "history", "at least 1"),
    ("history = 1.5", "history", "invalid literal"),
    ("store = srv/byteback", "store", "must be an absolute path"),
    ("suspicion_floor = 150%", "suspicion_floor", "from 0 to 1"),
    ("suspicion_floor = -0.1", "suspicion_floor", "from 0 to 1"),
    ("suspicion_floor = nan", "suspicion_floor", "from 0 to 1"),
    ("suspicion_floor = some", "suspicion_floor", "could not convert"),
    ("normal_growth = -5%", "normal_growth", "from 0 to 100"),
    ("normal_growth = fast", "normal_growth", "could not convert"),
    ("share_growth = 20000%", "share_growth", "from 0 to 100"),
    ("share_growth = nan", "share_growth", "from 0 to 100"),
])
def test_a_bad_value_names_the_file_the_line_and_the_key(fs, line, key, why):
    message = load_error(fs, f"[server]\n# the line below is line 3\n{line}\n")
    assert message.startswith(f"{CONF} line 3: bad value for {key}: ")
    assert why in message


def test_a_duplicate_key_is_an_error_naming_its_line(fs):
    message = load_error(fs, "[server]\nhistory = 5\nhistory = 6\n")
    assert message == f"{CONF} line 3: 'history' is set twice"


def test_a_duplicate_section_is_an_error_naming_its_line(fs):
    message = load_error(fs, "[server]\nhistory = 5\n\n[server]\norder = age\n")
    assert message.startswith(f"{CONF} line 4: ") and "[server]" in message


def test_a_key_outside_any_section_names_the_line(fs):
    message = load_error(fs, "# settings\nhistory = 5\n")
    assert message.startswith(f"{CONF} line 2: ") and "[server]" in message


def test_a_line_without_equals_names_the_line(fs):
    message = load_error(fs, "[server]\nhistory = 5\njust some words\n")
    assert message.startswith(f"{CONF} line 3: ")


@pytest.mark.parametrize("text", ["[DEFAULT]\nhistroy = 5\n", "[DEFAULT]\nhistory = 5\n[server]\n"])
def test_a_default_section_is_refused_not_silently_ignored(fs, text):
    # configparser keeps [DEFAULT] out of sections(): its keys used to be
    # ignored, or merged into [server] without any check of their line.
    message = load_error(fs, text)
    assert message.startswith(f"{CONF} line 1: ") and "DEFAULT" in message


def test_an_unreadable_server_conf_is_a_clear_error(fs):
    fs.create_dir(CONF)                  # a directory where the file should be
    with pytest.raises(ByteBackError, match=f"cannot read {CONF}"):
        byteback.load_server_config(CONF_DIR)


def test_a_server_conf_that_is_not_utf8_is_a_clear_error(fs):
    fs.create_file(CONF, contents=b"[server]\nstore = /srv/\xff\n")
    with pytest.raises(ByteBackError, match=f"cannot read {CONF}"):
        byteback.load_server_config(CONF_DIR)


# -- parse_targets on its own --

@pytest.mark.parametrize("text,days", [
    ("0,1,2,3,7,14,21,28,56,112", (0.0, 1.0, 2.0, 3.0, 7.0, 14.0, 21.0, 28.0, 56.0, 112.0)),
    ("7", (7.0,)),
    (" 3 , 1 ", (1.0, 3.0)),
    ("1 1 1", (1.0,)),
])
def test_parse_targets(text, days):
    assert byteback.parse_targets(text) == days


# -- the original byteback's one-value-per-file settings --

def test_read_setting_skips_comments_blank_lines_and_whitespace(fs):
    fs.create_file(f"{CONF_DIR}/destination",
                   contents="# where the backups go\n\n   byteback@backup.example.com:  \n\nignored\n")
    assert byteback.read_setting(CONF_DIR, "destination") == "byteback@backup.example.com:"


def test_read_setting_of_a_missing_file_gives_the_default(fs):
    assert byteback.read_setting(CONF_DIR, "destination") is None
    assert byteback.read_setting(CONF_DIR, "io_timeout", 300, int) == 300


@pytest.mark.parametrize("contents", ["", "\n\n", "# only\n  # comments\n"])
def test_read_setting_of_an_empty_file_gives_the_default(fs, contents):
    fs.create_file(f"{CONF_DIR}/io_timeout", contents=contents)
    assert byteback.read_setting(CONF_DIR, "io_timeout", 300, int) == 300


def test_read_setting_converts(fs):
    fs.create_file(f"{CONF_DIR}/io_timeout", contents="120\n")
    assert byteback.read_setting(CONF_DIR, "io_timeout", 300, byteback._positive_int) == 120


def test_read_setting_with_a_bad_value_names_the_file(fs):
    fs.create_file(f"{CONF_DIR}/io_timeout", contents="soon\n")
    with pytest.raises(ByteBackError) as exc:
        byteback.read_setting(CONF_DIR, "io_timeout", 300, byteback._positive_int)
    assert str(exc.value).startswith(f"{CONF_DIR}/io_timeout line 1: bad value: ")


def test_read_setting_with_a_bad_value_after_comments_names_its_real_line(fs):
    fs.create_file(f"{CONF_DIR}/io_timeout", contents="# seconds\n\n0\n")
    with pytest.raises(ByteBackError) as exc:
        byteback.read_setting(CONF_DIR, "io_timeout", 300, byteback._positive_int)
    assert str(exc.value).startswith(f"{CONF_DIR}/io_timeout line 3: bad value: ")


# -- excludes and rsync_flags, read as the original byteback read them --

def test_excludes_lines_are_kept_verbatim_but_for_the_newline(fs):
    """rsync --exclude-from read them for the original: spaces belong to the name."""
    fs.create_file(f"{CONF_DIR}/excludes", contents=(
        "# byteback excludes\n/var/log/*.gz\n\n   *.o  \n; a comment too\n/srv/My Files/\n"
        "   # indented: a pattern\n"))
    assert byteback.exclude_lines(byteback.read_setting_text(CONF_DIR, "excludes")) == [
        "/var/log/*.gz", "   *.o  ", "/srv/My Files/", "   # indented: a pattern"]


def test_a_missing_setting_file_reads_as_empty(fs):
    assert byteback.read_setting_text(CONF_DIR, "excludes") == ""
    assert byteback.exclude_lines("") == [] and byteback.split_rsync_flags("") == []


def test_an_excludes_line_that_is_not_utf8_keeps_its_bytes(fs):
    fs.create_file(f"{CONF_DIR}/excludes", contents=b"/tmp/\xff\n")
    (line,) = byteback.exclude_lines(byteback.read_setting_text(CONF_DIR, "excludes"))
    assert os.fsencode(line) == b"/tmp/\xff"


def test_an_unreadable_setting_file_is_a_clear_error(fs):
    fs.create_dir(f"{CONF_DIR}/excludes")
    with pytest.raises(ByteBackError, match=f"cannot read {CONF_DIR}/excludes"):
        byteback.read_setting_text(CONF_DIR, "excludes")


@pytest.mark.parametrize("text,flags", [
    ("--exclude=/srv/My Files\n", ["--exclude=/srv/My Files"]),        # one line, one argument
    ("-z --acls\n", ["-z", "--acls"]),                                  # several options on a line
    ("--acls\n--bwlimit=100\n", ["--acls", "--bwlimit=100"]),           # one per line
    ('--exclude="/srv/My Files" --acls\n', ["--exclude=/srv/My Files", "--acls"]),   # quotes honoured
    ("  --acls  \n# a comment\n\n", ["--acls"]),
    ("--exclude /srv/x\n", ["--exclude /srv/x"]),    # the original passed it whole too
])
def test_rsync_flags_are_split_as_the_original_passed_them(text, flags):
    assert byteback.split_rsync_flags(text) == flags


def test_rsync_flags_with_a_broken_quote_name_the_line():
    with pytest.raises(ByteBackError, match="rsync_flags line 2: .*fix its quoting"):
        byteback.split_rsync_flags('--acls\n--exclude="/srv/x --z\n')


# -- where the client keeps its state --

def test_client_state_dir_follows_the_environment(monkeypatch):
    monkeypatch.setenv("BYTEBACK_STATE_DIR", "/run/bb-state")
    assert str(byteback.client_state_dir()) == "/run/bb-state"
    monkeypatch.delenv("BYTEBACK_STATE_DIR")
    if byteback.os.geteuid() == 0:
        assert str(byteback.client_state_dir()) == "/var/lib/byteback"
    else:
        monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
        assert str(byteback.client_state_dir()) == "/home/u/.state/byteback"
