#!/bin/sh
# bench/get_llamacpp.sh DIR - llama.cpp's tools for bench/vs_llamacpp.py, from Debian unstable's binary
# packages (llama.cpp-tools, libllama0, libggml0: CPU backend only, in variants for each x86-64 level
# that ggml picks from at run time), unpacked under DIR together with the C/C++ runtime they were
# built against (libc6, libstdc++6, ...: newer than an older Debian's), and wrappers DIR/bin/llama-bench,
# llama-quantize, llama-completion, llama-cli that run them through that runtime's own loader.
# Nothing is installed and the system's apt configuration is not touched: apt-get runs on lists of
# its own under DIR/apt, from the Debian mirror this machine's apt already uses.
#
#   sh bench/get_llamacpp.sh /work/llamacpp
#   python3 bench/vs_llamacpp.py --llama-bench /work/llamacpp/bin/llama-bench
#
# Needs apt-get and dpkg-deb (Debian, Ubuntu), amd64. VERSION=... picks the llama.cpp-tools version
# (default: unstable's newest).
set -eu
DIR=${1:?usage: sh bench/get_llamacpp.sh DIR}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "sid" || $2 == "unstable" {print $1; exit}')
[ -n "$MIRROR" ] || MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$1 ~ /debian\/$/ {print $1; exit}')
[ -n "$MIRROR" ] || { echo "error: no Debian mirror in this machine's apt sources" >&2; exit 1; }

A=$DIR/apt
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$DIR/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg arch=amd64] $MIRROR sid main" > "$A/sources.list"
APT="-o Dir::Etc::SourceList=$A/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$A/lists
     -o Dir::Cache=$A/cache -o APT::Architecture=amd64"
# shellcheck disable=SC2086
apt-get $APT update >/dev/null
TOOLS=llama.cpp-tools${VERSION:+=$VERSION}
# The tools, the libraries they load, and the runtime they need (dpkg-deb -I shows the versions).
# shellcheck disable=SC2086
(cd "$DIR/debs" && apt-get -qq $APT download "$TOOLS" libllama0 libggml0 libc6 libstdc++6 libgcc-s1 libgomp1 \
    libssl3t64 libzstd1 zlib1g 2>&1 | grep -v "couldn't be accessed by user '_apt'" || true)
ls "$DIR"/debs/llama.cpp-tools_*.deb >/dev/null 2>&1 || { echo "error: downloading the packages failed" >&2; exit 1; }
rm -rf "$DIR/root"
for d in "$DIR"/debs/*.deb; do dpkg-deb -x "$d" "$DIR/root"; done

L=$DIR/root/usr/lib/x86_64-linux-gnu
# ggml looks for its CPU backends (libggml-cpu-<level>.so) in its compiled-in directory (absent here),
# then next to the executable, which, run through the loader, is the loader's directory: link them there.
for f in "$L"/ggml/backends0/libggml-cpu-*.so; do ln -sf "ggml/backends0/${f##*/}" "$L/${f##*/}"; done
mkdir -p "$DIR/bin"
for t in llama-bench llama-quantize llama-completion llama-cli; do
    cat > "$DIR/bin/$t" <<EOF
#!/bin/bash
# $t from Debian's llama.cpp-tools, through the loader and libraries unpacked by bench/get_llamacpp.sh;
# ggml's lines about its absent backend directory are left out.
exec 2> >(grep -v 'failed to enumerate /usr/lib/x86_64-linux-gnu/ggml/backends' >&2)
exec "$L/ld-linux-x86-64.so.2" --library-path "$L:$L/llama" "$DIR/root/usr/bin/$t" "\$@"
EOF
    chmod +x "$DIR/bin/$t"
done
"$DIR/bin/llama-bench" --version 2>&1 | grep -E "^(load_backend|version|built)"
echo "llama-bench: $DIR/bin/llama-bench"
