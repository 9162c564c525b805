"""The command line: every virtiofsd (1.13) option, its spellings, the legacy -o form, and what
each becomes in vfsd's Config and FUSE session options.  In process, no daemon."""

from __future__ import annotations

import errno
import json
import logging
import re
from pathlib import Path

import pytest

from vfsd import cli, daemon
from vfsd.config import (Config, ConfigError, XattrRule, parse_modcaps, parse_xattrmap)
from vfsd.legacy_options import LEGACY_KEYS, split_options

REPO = Path(__file__).resolve().parents[2]
BASE = ["--shared-dir", "/srv/share", "--socket-path", "/run/vfsd.sock"]

#: virtiofsd 1.13's options (src/main.rs), as spelled on its command line.
VIRTIOFSD_LONG_OPTIONS = [
    "--shared-dir", "--tag", "--socket", "--socket-path", "--socket-group", "--fd",
    "--thread-pool-size", "--xattr", "--posix-acl", "--xattrmap", "--sandbox", "--readonly",
    "--seccomp", "--announce-submounts", "--no-announce-submounts", "--inode-file-handles",
    "--cache", "--allow-mmap", "--no-readdirplus", "--writeback", "--allow-direct-io",
    "--print-capabilities", "--modcaps", "--log-level", "--syslog", "--rlimit-nofile",
    "--no-killpriv-v2", "--killpriv-v2", "--security-label", "--uid-map", "--gid-map",
    "--translate-uid", "--translate-gid", "--preserve-noatime", "--migration-mode",
    "--migration-on-error", "--migration-verify-handles", "--migration-confirm-paths",
    "--version", "--help",
]
VIRTIOFSD_SHORT_OPTIONS = ["-o", "-d", "-f", "-V", "-h"]


def parse(*args: str) -> Config:
    c = cli.parse_args([*BASE, *args])
    assert c is not None
    return c


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------
# the option set
# ---------------------------------------------------------------------------

def _parser_options() -> set[str]:
    return {s for a in cli.build_parser()._actions for s in a.option_strings}


def test_every_virtiofsd_option_is_known():
    known = _parser_options()
    missing = [o for o in VIRTIOFSD_LONG_OPTIONS + VIRTIOFSD_SHORT_OPTIONS if o not in known]
    assert not missing


def test_compat_doc_covers_every_option_and_names_only_real_ones():
    doc = (REPO / "docs" / "virtiofsd-compat.md").read_text()
    named = set(re.findall(r"`(--[a-z0-9-]+)", doc)) | set(re.findall(r"`(-[a-zA-Z])\b", doc))
    for o in VIRTIOFSD_LONG_OPTIONS + VIRTIOFSD_SHORT_OPTIONS:
        assert o in named, f"{o} is not in docs/virtiofsd-compat.md"
    unknown = named - _parser_options() - {"--daemonize"}
    assert not unknown, f"the doc names options vfsd does not have: {unknown}"
    for key in LEGACY_KEYS:
        assert f"`{key}" in doc, f"-o {key} is not in docs/virtiofsd-compat.md"


def test_defaults():
    c = parse()
    assert (c.shared_dir, c.socket_path, c.fd) == ("/srv/share", "/run/vfsd.sock", None)
    assert c.cache == "auto" and c.entry_timeout == 1.0 and c.effective_readdirplus
    assert not c.xattr and not c.posix_acl and not c.security_label and c.xattrmap is None
    assert c.announce_submounts and c.killpriv_v2 and not c.writeback
    assert not c.allow_direct_io and not c.allow_mmap and not c.preserve_noatime
    assert c.sandbox is None and c.seccomp is None and c.rlimit_nofile is None
    assert c.inode_file_handles == "never" and c.thread_pool_size == 0
    assert c.poll_max_us == 300
    assert c.log_level == "info" and not c.syslog and c.record_name == "user.o"
    assert c.notes == []


VALUE_OPTIONS = [
    ("--tag", "myfs", "tag", "myfs"),
    ("--thread-pool-size", "4", "thread_pool_size", 4),
    ("--poll-max-us", "0", "poll_max_us", 0),
    ("--cache", "always", "cache", "always"),
    ("--cache", "NEVER", "cache", "never"),
    ("--cache", "none", "cache", "never"),
    ("--sandbox", "chroot", "sandbox", "chroot"),
    ("--seccomp", "log", "seccomp", "log"),
    ("--log-level", "debug", "log_level", "debug"),
    ("--rlimit-nofile", "4096", "rlimit_nofile", 4096),
    ("--inode-file-handles", "prefer", "inode_file_handles", "prefer"),
    ("--migration-mode", "file-handles", "migration_mode", "file-handles"),
    ("--migration-on-error", "guest-error", "migration_on_error", "guest-error"),
    ("--socket-group", "kvm", "socket_group", "kvm"),
    ("--record-name", "user.vfsd", "record_name", "user.vfsd"),
    ("--modcaps", "+sys_admin:-chown", "modcaps", (("+", "sys_admin"), ("-", "chown"))),
]


@pytest.mark.parametrize("opt,value,attr,expected", VALUE_OPTIONS)
def test_equals_and_space_forms(opt, value, attr, expected):
    assert getattr(parse(f"{opt}={value}"), attr) == expected
    assert getattr(parse(opt, value), attr) == expected


FLAG_OPTIONS = [
    ("--readonly", "readonly", True), ("--writeback", "writeback", True),
    ("--no-readdirplus", "readdirplus", False), ("--allow-direct-io", "allow_direct_io", True),
    ("--no-readdirplus-readahead", "readdirplus_readahead", False),
    ("--allow-mmap", "allow_mmap", True), ("--no-killpriv-v2", "killpriv_v2", False),
    ("--no-announce-submounts", "announce_submounts", False),
    ("--security-label", "security_label", True), ("--syslog", "syslog", True),
    ("--preserve-noatime", "preserve_noatime", True),
    ("--migration-verify-handles", "migration_verify_handles", True),
    ("--migration-confirm-paths", "migration_confirm_paths", True),
    ("--xattr", "xattr", True), ("--posix-acl", "posix_acl", True),
    ("--no-xattr", "xattr", False), ("--no-posix-acl", "posix_acl", False),
]


@pytest.mark.parametrize("opt,attr,expected", FLAG_OPTIONS)
def test_flags(opt, attr, expected):
    assert getattr(parse(opt), attr) == expected


def test_later_flag_overrides_earlier():
    assert parse("--killpriv-v2", "--no-killpriv-v2").killpriv_v2 is False
    assert parse("--no-killpriv-v2", "--killpriv-v2").killpriv_v2 is True
    assert parse("--no-announce-submounts", "--announce-submounts").announce_submounts
    assert parse("--cache", "never", "--cache", "always").cache == "always"


def _xattr_acl(*args: str) -> tuple[bool, bool]:
    c = parse(*args)
    return c.xattr, c.posix_acl


@pytest.mark.parametrize("args,expected", [
    # virtiofsd's defaults: no guest xattrs, no ACLs, unless asked for
    ((), (False, False)),
    (("--xattr",), (True, False)),                   # --xattr alone: no ACLs (virtiofsd)
    (("--posix-acl",), (True, True)),                # --posix-acl implies --xattr
    (("--xattr", "--posix-acl"), (True, True)),
    (("-o", "xattr"), (True, False)),
    (("-o", "posix_acl"), (True, True)),
    (("-o", "xattr,posix_acl"), (True, True)),
    (("--security-label",), (True, False)),          # implies --xattr
    (("--xattrmap", ":ok:all:::"), (True, False)),   # implies --xattr
    # explicit offs
    (("--no-xattr",), (False, False)),
    (("--no-posix-acl",), (False, False)),
    (("--xattr", "--no-posix-acl"), (True, False)),
    (("--posix-acl", "--no-posix-acl"), (False, False)),
    (("--xattr", "--no-xattr"), (False, False)),
    (("-o", "no_xattr"), (False, False)),
    (("--xattr", "-o", "no_xattr"), (False, False)),  # -o wins, as in virtiofsd
    (("--posix-acl", "-o", "no_posix_acl"), (False, False)),
    # what implies --xattr wins over --no-xattr (virtiofsd has no --no-xattr)
    (("--no-xattr", "--posix-acl"), (True, True)),
    (("--no-xattr", "--security-label"), (True, False)),
    (("--no-xattr", "--xattrmap", ":ok:all:::"), (True, False)),
])
def test_xattr_and_acl_defaults_and_implications(args, expected):
    assert _xattr_acl(*args) == expected


def test_xattr_defaults_reach_the_session_and_filesystem():
    """No option: the FUSE session offers no xattr handlers and no FUSE_POSIX_ACL, and the
    filesystem keeps no ACLs in step with the mode; --xattr alone adds xattrs only."""
    o = daemon.session_options(parse())
    assert not o.xattr and not o.posix_acl
    assert daemon.filesystem(parse(), _FakeFs).kw["posix_acl"] is False
    o = daemon.session_options(parse("--xattr"))
    assert o.xattr and not o.posix_acl
    assert daemon.filesystem(parse("--xattr"), _FakeFs).kw["posix_acl"] is False
    o = daemon.session_options(parse("--posix-acl"))
    assert o.xattr and o.posix_acl
    assert daemon.filesystem(parse("--posix-acl"), _FakeFs).kw["posix_acl"] is True


def test_cache_never_disables_readdirplus_and_timeouts():
    c = parse("--cache", "never")
    assert c.entry_timeout == 0.0 and not c.effective_readdirplus and c.readdirplus
    assert parse("--cache", "metadata").entry_timeout == 86400.0
    assert not parse("--no-readdirplus").effective_readdirplus


def test_socket_alias_and_fd():
    c = cli.parse_args(["--shared-dir", "/d", "--socket", "/s"])
    assert c.socket_path == "/s"
    assert any("--socket is deprecated" in m for _, m in c.notes)
    c = cli.parse_args(["--shared-dir", "/d", "--fd=31"])
    assert c.fd == 31 and c.socket_path is None


def test_compat_short_flags():
    c = parse("-d", "-f")
    assert c.log_level == "debug"
    text = " ".join(m for _, m in c.notes)
    assert "-d is deprecated" in text and "-f has no effect" in text


@pytest.mark.parametrize("argv,message", [
    ([], "--shared-dir"),
    (["--shared-dir", "/d"], "one of --socket-path or --fd is required"),
    (["--shared-dir", "/d", "--fd", "3", "--socket-path", "/s"], "--fd cannot be used"),
    (["--shared-dir", "/d", "--fd", "3", "--socket-group", "kvm"], "--socket-group cannot"),
    ([*BASE, "--daemonize"], "never daemonizes"),
    ([*BASE, "--inode-file-handles=mandatory"], "CAP_DAC_READ_SEARCH"),
    ([*BASE, "--migration-mode=file-handles", "--migration-confirm-paths"], "unnecessary"),
    ([*BASE, "--record-name", "trusted.o"], "user.* xattr name"),
    ([*BASE, "--thread-pool-size", "-1"], "must be >= 0"),
    ([*BASE, "--rlimit-nofile", "lots"], "invalid number"),
    ([*BASE, "--cache", "sometimes"], "invalid choice"),
    ([*BASE, "--sandbox", "jail"], "invalid choice"),
    ([*BASE, "--seccomp", "maybe"], "invalid choice"),
    ([*BASE, "--tag", ""], "--tag must be"),
    ([*BASE, "--tag", "x" * 37], "--tag must be"),
    ([*BASE, "--modcaps", "+sys_admn"], "unknown capability"),
    ([*BASE, "--modcaps", "sys_admin"], "must start with + or -"),
    ([*BASE, "--xattrmap", ":frob:all:::"], "unknown type"),
    ([*BASE, "--translate-uid", "nonsense"], ""),
    ([*BASE, "--frobnicate"], "unrecognized arguments"),
    ([*BASE, "--shared", "/x"], "unrecognized arguments"),  # no abbreviations (clap has none)
])
def test_usage_errors(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_print_capabilities(capsys):
    assert cli.parse_args(["--print-capabilities"]) is None
    caps = json.loads(capsys.readouterr().out)
    assert caps == {"type": "fs", "features": ["separate-options"]}
    # libvirt passes nothing else; with other options it is still just the capabilities
    assert cli.main(["--print-capabilities", "--fd=3", "-o", "source=/x"]) == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["-V"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"vfsd \d+\.\d+\.\d+\S*\n", out), out


def test_help_mentions_the_compat_doc(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    assert "virtiofsd-compat.md" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the legacy -o form
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("source=/a,xattr", ["source=/a", "xattr"]),
    ("source=/a,,b,xattr", ["source=/a,b", "xattr"]),
    ("source=/a,,,,b", ["source=/a,,b"]),
    ("source=/a,,", ["source=/a,"]),
    ("xattr,", ["xattr"]),
    ("", []),
])
def test_split_options(value, expected):
    assert split_options(value) == expected


def test_c_virtiofsd_command_line():
    c = cli.parse_args(["--socket-path=/tmp/s", "-o", "source=/srv/d", "-o", "cache=auto",
                        "-o", "xattr"])
    assert (c.shared_dir, c.socket_path, c.cache, c.xattr) == ("/srv/d", "/tmp/s", "auto", True)
    assert not c.posix_acl
    assert any("-o option form is deprecated" in m for _, m in c.notes)


def test_libvirt_legacy_command_line():
    c = cli.parse_args(["--fd=31", "-o", "source=/srv/a,,b,cache=always,sandbox=chroot,xattr,"
                        "no_flock,no_posix_lock", "--thread-pool-size=2", "-d"])
    assert (c.fd, c.shared_dir, c.cache, c.sandbox) == (31, "/srv/a,b", "always", "chroot")
    assert c.xattr and not c.posix_acl and c.thread_pool_size == 2 and c.log_level == "debug"


def test_libvirt_separate_options_command_line():
    c = cli.parse_args(["--fd=31", "--shared-dir", "/srv/a,b", "--cache", "never", "--sandbox",
                        "namespace", "--xattr", "--thread-pool-size=2", "--rlimit-nofile=1024",
                        "--log-level", "debug", "--uid-map=:0:1000:1:", "--gid-map=:0:1000:1:"])
    assert (c.fd, c.shared_dir, c.cache, c.sandbox) == (31, "/srv/a,b", "never", "namespace")
    assert c.rlimit_nofile == 1024 and c.uidmap.host_to_guest(1000) == 0
    assert c.xattr and not c.posix_acl


@pytest.mark.parametrize("item,attr,expected", [
    ("cache=none", "cache", "never"), ("cache=never", "cache", "never"),
    ("cache=metadata", "cache", "metadata"), ("cache=always", "cache", "always"),
    ("timeout=2.5", "entry_timeout", 2.5), ("timeout=0", "entry_timeout", 0.0),
    ("xattr", "xattr", True), ("no_xattr", "xattr", False),
    ("posix_acl", "posix_acl", True), ("posix_acl", "xattr", True),
    ("no_posix_acl", "posix_acl", False),
    ("security_label", "security_label", True), ("no_security_label", "security_label", False),
    ("readdirplus", "readdirplus", True), ("no_readdirplus", "readdirplus", False),
    ("writeback", "writeback", True), ("no_writeback", "writeback", False),
    ("allow_direct_io", "allow_direct_io", True),
    ("no_allow_direct_io", "allow_direct_io", False),
    ("announce_submounts", "announce_submounts", True),
    ("no_announce_submounts", "announce_submounts", False),
    ("killpriv_v2", "killpriv_v2", True), ("no_killpriv_v2", "killpriv_v2", False),
    ("log_level=err", "log_level", "error"), ("log_level=warn", "log_level", "warn"),
    ("loglevel=debug", "log_level", "debug"), ("debug", "log_level", "debug"),
    ("sandbox=namespace", "sandbox", "namespace"), ("sandbox=none", "sandbox", "none"),
    ("modcaps=+sys_admin", "modcaps", (("+", "sys_admin"),)),
    ("xattrmap=:ok:all:::", "xattrmap", (XattrRule("ok", "all", "", ""),)),
    ("no_flock", "cache", "auto"), ("no_posix_lock", "cache", "auto"),
    ("norace", "cache", "auto"), ("allow_root", "cache", "auto"),
    ("max_idle_threads=4", "cache", "auto"),
])
def test_legacy_keys(item, attr, expected):
    c = cli.parse_args(["--socket-path=/s", "-o", f"source=/d,{item}"])
    assert getattr(c, attr) == expected


def test_legacy_overrides_long_options():
    c = cli.parse_args(["-o", "cache=none,source=/o", "--shared-dir=/long", "--cache=always",
                        "--socket-path=/s"])
    assert (c.shared_dir, c.cache) == ("/o", "never")


def test_legacy_no_effect_items_are_logged():
    c = cli.parse_args(["--socket-path=/s", "-o", "source=/d,norace,allow_root"])
    text = " ".join(m for _, m in c.notes)
    assert "norace has no effect" in text and "allow_root has no effect" in text


@pytest.mark.parametrize("item,message", [
    ("frob", "unknown option"), ("cache=sometimes", "expected one of"),
    ("source", "needs a value"), ("xattr=1", "takes no value"),
    ("timeout=soon", "seconds"), ("timeout=-1", "seconds"),
    ("flock", "does not implement remote flock locks"),
    ("posix_lock", "does not implement remote posix_lock locks"),
    ("log_level=loud", "expected one of"), ("sandbox=jail", "expected one of"),
    ("max_idle_threads=many", "expected a number"),
])
def test_legacy_errors(capsys, item, message):
    err = usage_error(capsys, "--socket-path=/s", "-o", f"source=/d,{item}")
    assert message in err and f"-o {item}" in err


def test_legacy_xattrmap_with_doubled_comma():
    # a delimiter that is a comma must be doubled inside -o
    c = cli.parse_args(["--socket-path=/s", "-o", "source=/d,xattrmap=,,ok,,all,,,,,,"])
    assert c.xattrmap == (XattrRule("ok", "all", "", ""),)


# ---------------------------------------------------------------------------
# value parsers
# ---------------------------------------------------------------------------

def test_xattrmap_examples_from_virtiofsd_docs():
    assert parse_xattrmap(":prefix:all::user.virtiofs.::bad:all:::") == (
        XattrRule("prefix", "all", "", "user.virtiofs."), XattrRule("bad", "all", "", ""))
    assert parse_xattrmap("""
        /prefix/all/trusted./user.virtiofs./
        /bad/server//trusted./
        /bad/client/user.virtiofs.//
        /ok/all///
    """) == (XattrRule("prefix", "all", "trusted.", "user.virtiofs."),
             XattrRule("bad", "server", "", "trusted."),
             XattrRule("bad", "client", "user.virtiofs.", ""),
             XattrRule("ok", "all", "", ""))
    assert parse_xattrmap(":unsupported:client:security.:: :ok:all:::")[0].type == "unsupported"


def test_xattrmap_map_rule_expands():
    assert parse_xattrmap(":map:trusted.:user.virtiofs.:") == (
        XattrRule("prefix", "all", "trusted.", "user.virtiofs."),
        XattrRule("bad", "all", "user.virtiofs.", "trusted."),
        XattrRule("ok", "all", "", ""))
    assert parse_xattrmap(":map::user.virtiofs.:") == (
        XattrRule("prefix", "all", "", "user.virtiofs."), XattrRule("bad", "all", "", ""))


@pytest.mark.parametrize("text,message", [
    ("", "no rules"), ("   ", "no rules"), (":prefix:all:x", "incomplete"),
    (":frob:all:::", "unknown type"), (":ok:everywhere:::", "unknown scope"),
    (":map:a:b: :ok:all:::", "must be the last rule"),
])
def test_xattrmap_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_xattrmap(text)


def test_modcaps():
    assert parse_modcaps("+SYS_ADMIN:-cap_chown") == (("+", "sys_admin"), ("-", "chown"))
    for bad in ("", "+", "+chown:", "*chown", "+nosuchcap"):
        with pytest.raises(ConfigError):
            parse_modcaps(bad)


# ---------------------------------------------------------------------------
# what the daemon makes of the Config
# ---------------------------------------------------------------------------

def test_session_options_follow_the_config():
    o = daemon.session_options(parse("--cache=never", "--writeback", "--security-label",
                                     "--no-killpriv-v2", "--no-announce-submounts", "--allow-mmap",
                                     "--posix-acl"))
    assert (o.entry_timeout, o.attr_timeout, o.direct_io, o.keep_cache) == (0, 0, True, False)
    assert not o.readdirplus and o.writeback and o.security_label and not o.killpriv_v2
    assert not o.announce_submounts and o.allow_mmap and o.xattr and o.posix_acl
    o = daemon.session_options(parse("--cache=always", "--no-xattr"))
    assert o.keep_cache and o.entry_timeout == 86400 and o.readdirplus and o.killpriv_v2
    assert not o.xattr and not o.posix_acl and o.readdirplus_readahead
    assert not daemon.session_options(parse("--no-readdirplus-readahead")).readdirplus_readahead
    o = daemon.session_options(cli.parse_args(["--socket-path=/s", "-o", "source=/d,timeout=7"]))
    assert o.entry_timeout == o.attr_timeout == 7


def test_process_options_are_logged_not_ignored(caplog, monkeypatch):
    calls = []
    monkeypatch.setattr(daemon, "_set_no_new_privs", lambda: calls.append(1))
    with caplog.at_level(logging.DEBUG, logger="vfsd"):
        daemon.apply_process_options(parse(
            "--sandbox=chroot", "--seccomp=kill", "--modcaps=+sys_admin", "--tag=myfs",
            "--inode-file-handles=prefer", "--migration-mode=file-handles"))
    text = caplog.text
    assert "--sandbox=chroot" in text and "confines itself to the share" in text
    assert "--seccomp=kill" in text and "no_new_privs" in text and calls == [1]
    assert "--modcaps=+sys_admin" in text and "--tag=myfs" in text
    assert "--inode-file-handles=prefer" in text and "--migration-*" in text
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.INFO, logger="vfsd"):
        daemon.apply_process_options(parse("--sandbox=none", "--seccomp=none"))
    assert "--sandbox" not in caplog.text and "--seccomp" not in caplog.text and calls == []


class _FakeFs:
    def __init__(self, shared_dir, **kw):
        self.kw = kw

    def check_xattr_support(self):
        pass


class _NoXattrFs(_FakeFs):
    def check_xattr_support(self):
        raise OSError(errno.ENOTSUP, "the shared directory's filesystem does not support "
                                     "user.* extended attributes, where vfsd keeps guest "
                                     "ownership")


def test_filesystem_seam():
    fs = daemon.filesystem(parse("--allow-direct-io", "--preserve-noatime",
                                 "--xattrmap", ":ok:all:::", "--posix-acl"), _FakeFs)
    assert fs.kw["allow_direct_io"] is True and fs.kw["preserve_noatime"] is True
    assert fs.kw["posix_acl"] is True
    assert fs.kw["xattrmap"].to_server(b"trusted.x") == b"trusted.x"
    assert daemon.filesystem(parse(), _FakeFs).kw["xattrmap"] is None
    assert daemon.filesystem(parse(), _FakeFs).kw["allow_direct_io"] is False
    assert daemon.filesystem(parse("--posix-acl", "--no-posix-acl"),
                             _FakeFs).kw["posix_acl"] is False
    assert daemon.filesystem(parse("--no-xattr"), _FakeFs).kw["posix_acl"] is False
    with pytest.raises(daemon.StartupError, match="does not support user.. extended attr"):
        daemon.filesystem(parse(), _NoXattrFs)


def test_pid_file_lock(tmp_path):
    path = str(tmp_path / "s.pid")
    first = daemon.PidFile(path)
    try:
        with pytest.raises(daemon.StartupError, match="is locked: another daemon"):
            daemon.PidFile(path)
    finally:
        first.release()
    assert not Path(path).exists()
    daemon.PidFile(path).release()
