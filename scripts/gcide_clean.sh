#!/bin/sh
# gcide_clean.sh GCIDE_DICT_DZ > gcide.txt
# Turns the dictd text of GCIDE (Webster 1913 + WordNet 1.5) into one paragraph per line:
#   - drops the 00-database-* header and licence block before the first entry;
#   - removes source tags ([1913 Webster], [PJC], [WordNet 1.5], ...), pronunciations \Co*ag"u*late\
#     and the {cross-reference} braces;
#   - maps GCIDE's ASCII accent codes ([=a], [e^], [imac], [ae], [eth], ...) to plain letters;
#   - turns quotation credits " --Shak." into " (Shak.)";
#   - joins continuation lines, one blank-line-separated paragraph per output line.
# Deterministic under LC_ALL=C (byte semantics for sed/awk/grep); used by build_corpus.sh.
set -eu
export LC_ALL=C
zcat "$1" |
awk '/^[A-Za-z]/ && !/^00-database/ {s=1} s' |
sed -E '
  s/\[[^]]*(Webster|WordNet|PJC|Century|RHUD|MW10|Chambers)[^]]*\]//g
  s/\[(i|a|u)(mac|um|dd)\]/\1/g
  s/\[=?(ae|AE|oe|OE|oo|ng|th)\^?\]/\1/g
  s/\[[=.~"`^*,-]?([A-Za-z])\^?\]/\1/g
  s/\[eth\]/th/g; s/\[thorn\]/th/g; s/\[yogh\]/y/g; s/\[deg\]/ degrees/g; s/\[sect\]/sect./g
  s/\\[^\\]*\\//g
  s/[{}]//g
  s/ --([A-Z][A-Za-z.]*)/ (\1)/g
' |
awk 'NF==0 { if (buf!="") print buf; buf=""; next }
     { sub(/^[ \t]+/,""); buf = (buf=="" ? $0 : buf " " $0) }
     END { if (buf!="") print buf }' |
sed -E 's/  +/ /g; s/ ,/,/g; s/ +$//' |
grep -av '^\[[^]]*\]$'
