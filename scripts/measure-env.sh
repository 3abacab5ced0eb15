# Sourced by the measuring scripts (seed-experiment.sh, memory.sh, instructions.sh): builds the
# release binary once, sets E to it, makes a scratch directory `dir` under ${DIR:-/var/tmp} named
# after $1, and on exit stops the daemon whose pid is in `pid` and removes the directory.
# A script that needs the test switches (serve --hot-path) sets features=testing before sourcing;
# the others measure the binary as shipped.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q ${features:+--features "$features"}
E=$PWD/target/release/extblk
dir=$(mktemp -d "${DIR:-/var/tmp}/extblk-$1.XXXXXX")
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
