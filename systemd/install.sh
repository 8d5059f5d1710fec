#!/usr/bin/env bash
# Install inference-proxy as a systemd service, or remove it: `make install-service` and
# `make uninstall-service` run this as root. Each step is printed as it is taken; running it
# again converges on the same tree (config and keys already there are kept).
#
#   systemd/install.sh install|uninstall
#
# DESTDIR=DIR puts every file under DIR instead of / and leaves the running system alone: no
# user, no ownership, no systemctl. The venv is built at its final place under DIR, so its
# scripts name that place: a DESTDIR tree runs where it was made (the tests' scratch root), and is
# not a package to copy elsewhere (venvs are not relocatable).
# PYTHON is the service's interpreter (default python3); BUILD_PYTHON builds the wheel (default
# the dev venv's, .venv/bin/python, made by `make install`: it has setuptools, the service does not).
set -euo pipefail

NAME=inference-proxy
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
BUILD_PYTHON=${BUILD_PYTHON:-$SRC/.venv/bin/python}
PREFIX=/opt/$NAME
CONFDIR=/etc/$NAME
UNIT=/etc/systemd/system/$NAME.service
VENV=$DESTDIR$PREFIX/.venv

step() { printf '%s: %s\n' "$NAME" "$*"; }
warn() { printf '%s: warning: %s\n' "$NAME" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$NAME" "$*" >&2
	exit 1
}

# systemctl only when systemd manages this machine (it is PID 1) and the files went to /.
systemd_running() { [[ -z $DESTDIR && -d /run/systemd/system ]]; }

# Skip reason for what touches the running system, or nothing when it may be touched.
why_not_systemctl() {
	if [[ -n $DESTDIR ]]; then
		echo "DESTDIR is set"
	elif ! systemd_running; then
		echo "systemd is not running here (no /run/systemd/system)"
	fi
}

# chown OWNER PATH unless DESTDIR is set (the scratch tree's files stay the caller's).
own() {
	if [[ -z $DESTDIR ]]; then
		chown "$1" "$2"
		step "made $2 owned by $1"
	fi
}

check_python() {
	local home
	home=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))') ||
		die "cannot run PYTHON=$PYTHON"
	"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "PYTHON=$PYTHON is older than Python 3.11"
	"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
		die "PYTHON=$PYTHON cannot make a venv with pip (on Debian: apt-get install python3-venv)"
	case $home/ in
	/home/* | /root/* | /run/user/*)
		local hidden="PYTHON=$PYTHON lives in $home, which the unit's ProtectHome=yes hides from the"
		hidden+=" service; use a system interpreter (PYTHON=/usr/bin/python3)"
		if [[ -n $DESTDIR ]]; then warn "$hidden (a DESTDIR tree is not run by systemd)"; else die "$hidden"; fi
		;;
	esac
}

make_user() {
	if [[ -n $DESTDIR ]]; then
		step "DESTDIR is set: not creating the system user $NAME, not changing ownership"
	elif id -u "$NAME" >/dev/null 2>&1; then
		step "system user $NAME exists"
	else
		local shell=/usr/sbin/nologin
		[[ -x $shell ]] || shell=/sbin/nologin
		[[ -x $shell ]] || shell=/bin/false
		useradd --system --user-group --no-create-home --home-dir /nonexistent --shell "$shell" "$NAME"
		step "created system user $NAME (no home, shell $shell)"
	fi
}

make_venv() {
	# The same interpreter at the same version keeps the venv; another one rebuilds it.
	local probe='import os, sys; print(os.path.realpath(sys.base_prefix), sys.version_info[:3])'
	if [[ -x $VENV/bin/python && $("$VENV/bin/python" -c "$probe" 2>/dev/null) == $("$PYTHON" -c "$probe") ]]; then
		step "venv $VENV exists (made by $PYTHON)"
	else
		"$PYTHON" -m venv --clear "$VENV"
		step "made venv $VENV with $PYTHON"
	fi
	"$VENV/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
		--require-hashes --no-deps -r "$SRC/requirements/runtime.txt"
	step "installed the locked runtime dependencies (requirements/runtime.txt, hashes checked)"
}

install_package() {
	[[ -x $BUILD_PYTHON ]] ||
		die "no $BUILD_PYTHON to build the wheel with: run \`make install\` first"
	local tmp
	tmp=$(mktemp -d)
	# Built from a copy, so the checkout gets no build/ directory.
	tar -C "$SRC" --exclude=__pycache__ -cf - pyproject.toml README.md proxy | (mkdir "$tmp/src" && tar -C "$tmp/src" -xf -)
	"$BUILD_PYTHON" -m pip wheel --quiet --no-input --disable-pip-version-check \
		--no-deps --no-build-isolation "$tmp/src" -w "$tmp/dist"
	local wheel=("$tmp"/dist/*.whl)
	# --force-reinstall: the same version number with new code is still installed.
	"$VENV/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
		--no-deps --force-reinstall "${wheel[@]}"
	rm -rf "$tmp"
	"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null
	step "installed ${wheel[0]##*/} into the venv (not editable; pip check passes)"
	install -D -m 0644 "$SRC/README.md" "$DESTDIR$PREFIX/README.md"
	step "copied the README to $DESTDIR$PREFIX/README.md (the unit's Documentation=)"
}

install_config() {
	install -d -m 0750 "$DESTDIR$CONFDIR"
	step "directory $DESTDIR$CONFDIR, mode 0750"
	own "root:$NAME" "$DESTDIR$CONFDIR"
	local config=$DESTDIR$CONFDIR/proxy.yaml env=$DESTDIR$CONFDIR/env
	if [[ -e $config ]]; then
		step "kept $config (present; the shipped example is $SRC/conf/proxy.yaml)"
	else
		install -m 0640 "$SRC/conf/proxy.yaml" "$config"
		step "copied conf/proxy.yaml to $config (mode 0640)"
		own "root:$NAME" "$config"
	fi
	if [[ -e $env ]]; then
		chmod 0600 "$env"
		step "kept $env (present; mode 0600)"
		own root:root "$env"
	else
		(
			umask 077
			cat >"$env" <<-'EOF'
				# Environment of inference-proxy.service: systemd reads it as root before the gateway starts.
				# Client keys, comma-separated (auth.keys_env); unset, the gateway asks for none.
				#API_KEYS=key-one,key-two
				# A backend's key, named by its api_key_env in proxy.yaml:
				#GPU_A_KEY=
			EOF
		)
		chmod 0600 "$env"
		step "wrote the keys template $env (mode 0600)"
		own root:root "$env"
	fi
}

install_unit() {
	install -D -m 0644 "$SRC/systemd/$NAME.service" "$DESTDIR$UNIT"
	step "installed the unit $DESTDIR$UNIT"
	local why
	why=$(why_not_systemctl)
	if [[ -n $why ]]; then
		step "$why: skipped systemctl daemon-reload"
		return
	fi
	systemctl daemon-reload
	step "ran systemctl daemon-reload"
	if systemctl is-active --quiet "$NAME.service"; then
		step "$NAME is running the old code: systemctl restart $NAME to run the new"
	fi
}

install_all() {
	check_python
	make_user
	make_venv
	install_package
	install_config
	install_unit
	step "done; next: keys in $CONFDIR/env, then systemctl enable --now $NAME"
}

uninstall_all() {
	local why
	why=$(why_not_systemctl)
	if [[ -n $why ]]; then
		step "$why: skipped systemctl disable --now $NAME"
	elif [[ -e $UNIT ]]; then
		systemctl disable --now "$NAME.service"
		step "stopped and disabled $NAME"
	fi
	rm -f "$DESTDIR$UNIT"
	step "removed the unit $DESTDIR$UNIT"
	if [[ -z $why ]]; then
		systemctl daemon-reload
		step "ran systemctl daemon-reload"
	fi
	rm -rf "$DESTDIR$PREFIX"
	step "removed $DESTDIR$PREFIX"
	step "kept $DESTDIR$CONFDIR (config and keys) and the system user $NAME;" \
		"to remove them too: rm -r $CONFDIR && userdel $NAME"
}

if [[ -z $DESTDIR && $(id -u) -ne 0 ]]; then
	die "run as root (sudo make install-service), or set DESTDIR=DIR to install into a scratch tree"
fi
if [[ -n $DESTDIR && $DESTDIR != /* ]]; then
	die "DESTDIR must be an absolute path, not $DESTDIR"
fi
case ${1:-} in
install) install_all ;;
uninstall) uninstall_all ;;
*) die "usage: $0 install|uninstall" ;;
esac
