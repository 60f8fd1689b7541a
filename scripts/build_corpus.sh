#!/bin/sh
# build_corpus.sh [OUTDIR]   (default: data/corpus in the repository)
# Builds the byte-level training corpus of `moe-bench train` from five Debian packages, without
# installing anything: `apt-get download` (pinned versions) + `dpkg-deb -x` into a scratch folder.
#
#   domain    file          source                                      cleaned size
#   gcide     gcide.txt     dict-gcide  (Webster 1913 + WordNet 1.5)    29.0 MB, one paragraph a line
#   kjv       kjv.txt       bible-kjv + bible-kjv-text (KJV, 1611)       4.1 MB, one verse a line
#   wordnet   wordnet.txt   wordnet-base (WordNet 3.0 glosses)           9.0 MB, one synset a line
#   fortunes  fortunes.txt  fortunes + fortunes-min                      2.6 MB, records split by '%'
#   devil     devil.txt     dict-devil (Bierce, The Devil's Dictionary)  0.4 MB, entries split by blank lines
#
# The result is checked against the md5 sums below (also compiled into src/data/corpus.cpp);
# files are moved into OUTDIR only when every sum matches, so OUTDIR never holds a half-built
# corpus. Needs: apt-get, dpkg-deb, zcat, sed, awk, grep, md5sum; network access to the archive.
set -eu
export LC_ALL=C  # byte semantics for sed/awk/grep and a fixed glob order: the sums depend on it

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../data/corpus}
mkdir -p "$out"
out=$(cd "$out" && pwd)

packages="dict-gcide=0.48.5+nmu2 bible-kjv=4.38 bible-kjv-text=4.38 wordnet-base=1:3.0-37
fortunes=1:1.99.1-7.3 fortunes-min=1:1.99.1-7.3 dict-devil=1.0-13.1"

sums="08095e86ac84966845f4c51af97111a0  gcide.txt
0442864d38d37131885626cd0cfa2a12  kjv.txt
562fe6746284abb7202a1a5b8754834d  wordnet.txt
4f76c26646f7055c0a751e679800855b  fortunes.txt
32575e028933fa7d92a0b058c13cf133  devil.txt"

work=$(mktemp -d "${TMPDIR:-/tmp}/moe-corpus.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$work/deb" "$work/x" "$work/txt"

echo "build_corpus: downloading $(echo $packages | wc -w) Debian packages" >&2
# shellcheck disable=SC2086
(cd "$work/deb" && apt-get download $packages >/dev/null 2>"$work/apt.log") || {
  cat "$work/apt.log" >&2
  echo "build_corpus: error: apt-get download failed (pinned versions of Debian 12 bookworm)" >&2
  exit 1
}
for d in "$work"/deb/*.deb; do dpkg-deb -x "$d" "$work/x"; done

x=$work/x
t=$work/txt
sh "$here/gcide_clean.sh" "$x/usr/share/dictd/gcide.dict.dz" > "$t/gcide.txt"
# The KJV ships in a compressed binary format; its own reader runs from the unpacked package.
"$x/usr/bin/bible" -p "$x/usr/lib" -l0 gen1:1-rev22:21 | grep -E '^ +[0-9]+ ' |
  sed -E 's/^ +[0-9]+ //' > "$t/kjv.txt"
for f in noun verb adj adv; do
  grep -av '^  ' "$x/usr/share/wordnet/data.$f" | sed -E 's/^.*\| //; s/ +$//'
done > "$t/wordnet.txt"
for f in "$x"/usr/share/games/fortunes/*; do
  case $f in *.dat|*.u8) ;; *) cat "$f" ;; esac
done > "$t/fortunes.txt"
zcat "$x/usr/share/dictd/devil.dict.dz" | awk '/^[A-Z][A-Z]+, /{s=1} s' > "$t/devil.txt"

echo "$sums" > "$t/MD5SUMS"
if ! (cd "$t" && md5sum --quiet -c MD5SUMS >&2); then
  echo "build_corpus: error: checksums differ from the recorded ones (package versions or tools differ); nothing written to $out" >&2
  exit 1
fi
for f in gcide.txt kjv.txt wordnet.txt fortunes.txt devil.txt MD5SUMS; do
  mv -f "$t/$f" "$out/$f"
done
echo "build_corpus: corpus ready in $out ($(cat "$out"/*.txt | wc -c) bytes)" >&2
