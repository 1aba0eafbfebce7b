#!/usr/bin/env bash
# start_samba_ad.sh WORKDIR [LISTEN_ADDR]
#
# exedge's copy of the recipe in ../shared/research/directory-recipes, with
# exedge's own test users and groups (see "users" below).
#
# Starts a throw-away Samba Active Directory domain controller for tests.
#   WORKDIR      directory for this instance (created; must not hold a running instance)
#   LISTEN_ADDR  loopback address to listen on, default 127.0.0.1; "auto" picks the first
#                127.0.0.N (N=2..254) whose ports 389, 636, 3268, 3269 are free.
#                Samba's LDAP ports are hard-coded (389 LDAP/StartTLS, 636 LDAPS,
#                3268/3269 global catalog), so parallel instances need different
#                addresses (127.0.0.2, 127.0.0.3, ... all work on Linux without setup),
#                not different ports.
#
# The domain is provisioned once into a template directory (about 4-5 s) and copied
# for every instance (about 0.05 s); the server then answers LDAP in about 0.3-1 s.
# Prints KEY=VALUE lines (also written to WORKDIR/connection.env) and the PID.
# Stop with: stop_samba_ad.sh WORKDIR
#
# Environment (all optional):
#   SAMBA_AD_TEMPLATE   template dir (default ${TMPDIR:-/tmp}/samba-ad-template-fabrikam-<samba version>)
#   SAMBA_AD_SERVICES   samba "server services" (default "ldap"; e.g. "ldap,cldap,kdc")
#   SAMBA_AD_MAX_RUNTIME seconds after which samba exits by itself (default 10800)
#   SAMBA_AD_TIMEOUT    seconds to wait for LDAP to answer (default 60)
#   SAMBA_AD_EXTRA      extra smb.conf [global] lines, e.g.
#                       "ldap server require strong auth = no"  (allow simple binds without TLS)
# Needs (Debian 12): apt-get install --no-install-recommends samba samba-dsdb-modules \
#                    samba-vfs-modules samba-ad-provision   (plus openssl, python3)
# Must run as root (ports below 1024, sysvol ACLs).
set -euo pipefail

usage() { echo "usage: $0 WORKDIR [LISTEN_ADDR(127.x.y.z)]" >&2; exit 2; }
[ $# -ge 1 ] || usage
WORKDIR=$(realpath -m "$1")
ADDR=${2:-127.0.0.1}
if [ "$ADDR" = auto ]; then
  # serialise "auto" starts so two callers cannot pick the same address (lock dies with this script)
  exec 8>"${TMPDIR:-/tmp}/samba-ad-start.lock"; flock 8
  ADDR=$(python3 - <<'PYEOF'
import socket
for n in range(2, 255):
    addr, ok = f"127.0.0.{n}", True
    for port in (389, 636, 3268, 3269):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind((addr, port))
        except OSError: ok = False
        finally: s.close()
        if not ok: break
    if ok: print(addr); break
PYEOF
)
  [ -n "$ADDR" ] || { echo "no free 127.0.0.N address" >&2; exit 4; }
fi
case "$ADDR" in 127.*.*.*) ;; *) echo "LISTEN_ADDR must be a loopback address 127.x.y.z" >&2; exit 2;; esac

REALM=FABRIKAM.COM
DOMAIN=FABRIKAM
DNSDOMAIN=fabrikam.com
HOSTNAME_=dc1
BASE_DN="DC=fabrikam,DC=com"
ADMIN_PASS='Passw0rd!x'
USER_PASS='Gatew4y!pass'
SERVICES=${SAMBA_AD_SERVICES:-ldap}
MAXRUN=${SAMBA_AD_MAX_RUNTIME:-10800}
TIMEOUT=${SAMBA_AD_TIMEOUT:-60}

for b in samba samba-tool openssl python3 /usr/bin/python3 flock; do
  command -v "$b" >/dev/null || { echo "missing $b (see header for packages)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "samba must run as root" >&2; exit 3; }
SAMBA_VERSION=$(samba -V 2>/dev/null | awk '{print $2}')
TEMPLATE=${SAMBA_AD_TEMPLATE:-${TMPDIR:-/tmp}/exedge-samba-ad-template-v3-$SAMBA_VERSION}

if [ -f "$WORKDIR/samba.pid" ] && kill -0 "$(cat "$WORKDIR/samba.pid")" 2>/dev/null; then
  echo "an instance is already running in $WORKDIR (pid $(cat "$WORKDIR/samba.pid"))" >&2; exit 4
fi

# ---------------------------------------------------------------- template (once)
build_template() {
  local t="$1" tmp
  tmp=$(mktemp -d "${t}.build.XXXXXX")
  : > "$tmp/empty.conf"   # keeps /etc/samba/smb.conf out of the provision
  samba-tool domain provision -s "$tmp/empty.conf" --targetdir="$tmp/ad" \
    --realm=$REALM --domain=$DOMAIN --host-name=$HOSTNAME_ --server-role=dc \
    --dns-backend=NONE --use-rfc2307 --adminpass="$ADMIN_PASS" \
    --option="interfaces=127.0.0.1/8" --option="bind interfaces only=yes" \
    --option="server services=ldap" >"$tmp/provision.log" 2>&1 \
    || { cat "$tmp/provision.log" >&2; return 1; }
  # test users and groups, written straight into sam.ldb (no server needed)
  /usr/bin/python3 - "$tmp/ad/etc/smb.conf" "$tmp/ad/private/sam.ldb" <<'PYEOF' >>"$tmp/provision.log" 2>&1 \
    || { cat "$tmp/provision.log" >&2; return 1; }
import sys, ldb
from samba.samdb import SamDB
from samba.auth import system_session
from samba.param import LoadParm
lp = LoadParm(); lp.load(sys.argv[1])
db = SamDB(url=sys.argv[2], session_info=system_session(), lp=lp)
dom = "fabrikam.com"
# exedge's test directory (tests/test_directory_auth.py relies on these):
#   sAMAccountName, password, UPN (None: sam@fabrikam.com), enabled, groups
users = [
    ("smtpgateway", "Gatew4y!pass", None, True, []),
    ("edgesync", "Edg3sync!pass", None, True, ["Exchange Servers"]),
    ("relay01", "R3lay01!pass", None, True, ["Mail Relays"]),        # Exchange Servers through a nested group
    ("jdoe", "Jd0e!passw0rd", "jdoe@corp.fabrikam.com", True, []),   # UPN suffix differs from the mail domain
    ("bob", "Bob!pass1", None, False, ["Exchange Servers"]),          # disabled
    ("mallory", "Mall0ry!pass", None, True, []),                      # the test locks this one out
    ("joerg", "Pässwörd!1€", None, True, []),                         # non-ASCII password
]
db.newgroup("Exchange Servers", mailaddress="exchangeservers@" + dom)
db.newgroup("Mail Relays")
db.add_remove_group_members("Exchange Servers", ["Mail Relays"], add_members_operation=True)
for sam, pw, upn, enabled, groups in users:
    db.newuser(sam, pw, useusernameascn=True, mailaddress=f"{sam}@{dom}",
               givenname=sam.capitalize(), surname="Test")
    dn = db.search(db.domain_dn(), expression=f"(sAMAccountName={sam})", attrs=[])[0].dn
    m = ldb.Message(dn)
    # jdoe also receives as john.doe@ (a secondary proxy address, lower-case smtp:)
    proxies = [f"SMTP:{sam}@{dom}"] + (["smtp:John.Doe@" + dom] if sam == "jdoe" else [])
    m["proxyAddresses"] = ldb.MessageElement(proxies, ldb.FLAG_MOD_REPLACE, "proxyAddresses")
    if upn:
        m["userPrincipalName"] = ldb.MessageElement(upn, ldb.FLAG_MOD_REPLACE, "userPrincipalName")
    db.modify(m)
    for group in groups:
        db.add_remove_group_members(group, [sam], add_members_operation=True)
    if not enabled:
        db.disable_account(f"(sAMAccountName={sam})")
print("seeded")
PYEOF
  samba-tool domain passwordsettings set -s "$tmp/ad/etc/smb.conf" -H "$tmp/ad/private/sam.ldb" \
    --account-lockout-threshold=3 --account-lockout-duration=30 --reset-account-lockout-after=30 \
    >>"$tmp/provision.log" 2>&1 || { cat "$tmp/provision.log" >&2; return 1; }
  # CA-signed server cert (Samba's own self-signed one has no SAN and costs ~1.5 s at first start)
  local tls="$tmp/ad/private/tls"; mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=Test AD CA" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=$HOSTNAME_.$DNSDOMAIN" -keyout key.pem -out server.csr 2>/dev/null
    # every loopback address "auto" may pick, so clients can verify the name they dial
    ips=$(seq -s, -f 'IP:127.0.0.%g' 1 30)
    printf 'subjectAltName=DNS:%s.%s,DNS:%s,DNS:localhost,%s\nextendedKeyUsage=serverAuth\n' \
      "$HOSTNAME_" "$DNSDOMAIN" "$DNSDOMAIN" "$ips" > ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile ext.cnf -out cert.pem 2>/dev/null
    chmod 600 key.pem ca.key; rm -f server.csr ext.cnf
  )
  rm -rf "$t"; mv "$tmp/ad" "$t"; cp "$tmp/provision.log" "$t/provision.log"; rm -rf "$tmp"
}

mkdir -p "$(dirname "$TEMPLATE")"
(
  flock 9
  if [ ! -f "$TEMPLATE/private/sam.ldb" ] || [ ! -f "$TEMPLATE/private/tls/cert.pem" ]; then
    echo "provisioning template $TEMPLATE ..." >&2
    build_template "$TEMPLATE"
  fi
) 9>"$TEMPLATE.lock"

# ---------------------------------------------------------------- instance
ports_free() {  # ADDR PORT... : fail if something already listens there
  python3 - "$@" <<'PYEOF'
import socket, sys
addr = sys.argv[1]
for port in map(int, sys.argv[2:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try: s.bind((addr, port))
    except OSError as e: print(f"{addr}:{port} is in use ({e.strerror})", file=sys.stderr); sys.exit(1)
    finally: s.close()
PYEOF
}
ports_free "$ADDR" 389 636 3268 3269 || exit 4
rm -rf "$WORKDIR"; mkdir -p "$(dirname "$WORKDIR")"
cp -a "$TEMPLATE" "$WORKDIR"
mkdir -p "$WORKDIR/run" "$WORKDIR/cache"
cat > "$WORKDIR/etc/smb.conf" <<EOF
[global]
	netbios name = ${HOSTNAME_^^}
	realm = $REALM
	workgroup = $DOMAIN
	server role = active directory domain controller
	server services = $SERVICES
	interfaces = $ADDR/8
	bind interfaces only = yes
	private dir = $WORKDIR/private
	lock directory = $WORKDIR
	state directory = $WORKDIR/state
	cache directory = $WORKDIR/cache
	binddns dir = $WORKDIR/bind-dns
	pid directory = $WORKDIR/run
	ncalrpc dir = $WORKDIR/run/ncalrpc
	winbindd socket directory = $WORKDIR/run/winbindd
	ntp signd socket directory = $WORKDIR/run/ntp_signd
	log file = $WORKDIR/log.%m
	idmap_ldb:use rfc2307 = yes
	tls enabled = yes
	tls keyfile = $WORKDIR/private/tls/key.pem
	tls certfile = $WORKDIR/private/tls/cert.pem
	tls cafile = $WORKDIR/private/tls/ca.pem
${SAMBA_AD_EXTRA:-}

[sysvol]
	path = $WORKDIR/state/sysvol
	read only = No

[netlogon]
	path = $WORKDIR/state/sysvol/$DNSDOMAIN/scripts
	read only = No
EOF

# -F: foreground (no daemonising), -M single: one process (about 55 MB RSS)
samba -F --debug-stdout -M single -s "$WORKDIR/etc/smb.conf" --maximum-runtime="$MAXRUN" \
  </dev/null >"$WORKDIR/samba.log" 2>&1 8>&- &
PID=$!
echo "$PID" > "$WORKDIR/samba.pid"

# wait until an anonymous rootDSE search on ADDR:389 succeeds (stdlib-only LDAP client)
ldap_ping() {  # HOST PORT PID TIMEOUT
  python3 - "$@" <<'PYEOF'
import socket, sys, time
host, port, pid, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def tlv(tag, payload):
    n = len(payload)
    ln = bytes([n]) if n < 128 else b"\x82" + n.to_bytes(2, "big")
    return bytes([tag]) + ln + payload
# anonymous SearchRequest for the rootDSE (base "", scope base, (objectClass=*))
search = tlv(0x63, tlv(0x04, b"") + tlv(0x0a, b"\x00") + tlv(0x0a, b"\x00") + tlv(0x02, b"\x00")
             + tlv(0x02, b"\x00") + tlv(0x01, b"\x00") + tlv(0x87, b"objectClass")
             + tlv(0x30, tlv(0x04, b"namingContexts")))
REQ = tlv(0x30, tlv(0x02, b"\x01") + search)
def read_tlv(buf, i):
    tag = buf[i]; n = buf[i + 1]; i += 2
    if n & 0x80:
        k = n & 0x7f; n = int.from_bytes(buf[i:i + k], "big"); i += k
    return tag, i, n  # tag, start of value, length
def ping():
    with socket.create_connection((host, port), 1) as s:
        s.settimeout(5); s.sendall(REQ); buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk: raise OSError("connection closed")
            buf += chunk
            i = 0
            while True:  # walk complete LDAPMessages
                if len(buf) - i < 2: break
                try: tag, v, n = read_tlv(buf, i)
                except IndexError: break
                if v + n > len(buf): break
                _, mv, mn = read_tlv(buf, v)          # messageID
                op, ov, on = read_tlv(buf, mv + mn)   # protocolOp
                if op == 0x65:                        # SearchResultDone
                    _, rv, rn = read_tlv(buf, ov)
                    return buf[rv]                    # resultCode
                i = v + n
def alive():
    if pid <= 0: return True
    try:
        with open(f"/proc/{pid}/stat") as f: return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError: return False
t0 = time.time()
while time.time() - t0 < timeout:
    if not alive(): print("server process exited", file=sys.stderr); sys.exit(1)
    try:
        rc = ping()
        if rc == 0: sys.exit(0)
    except (OSError, IndexError):
        pass
    time.sleep(0.1)
print("timeout", file=sys.stderr); sys.exit(1)
PYEOF
}
if ! ldap_ping "$ADDR" 389 "$PID" "$TIMEOUT"; then
  echo "samba did not come up; log:" >&2; tail -30 "$WORKDIR/samba.log" >&2
  kill "$PID" 2>/dev/null || true; exit 5
fi

cat > "$WORKDIR/connection.env" <<EOF
SAMBA_PID=$PID
LDAP_URI=ldap://$ADDR:389
LDAPS_URI=ldaps://$ADDR:636
LDAP_HOST=$ADDR
LDAP_PORT=389
LDAPS_PORT=636
BASE_DN=$BASE_DN
REALM=$REALM
NETBIOS_DOMAIN=$DOMAIN
TLS_CA_FILE=$WORKDIR/private/tls/ca.pem
TLS_SERVER_NAME=$HOSTNAME_.$DNSDOMAIN
ADMIN_UPN=Administrator@$DNSDOMAIN
ADMIN_PASSWORD=$ADMIN_PASS
USER_UPN=smtpgateway@$DNSDOMAIN
USER_PASSWORD=$USER_PASS
USER_DN=CN=smtpgateway,CN=Users,$BASE_DN
GROUP_DN=CN=Exchange Servers,CN=Users,$BASE_DN
LOG_FILE=$WORKDIR/samba.log
EOF
cat "$WORKDIR/connection.env"
