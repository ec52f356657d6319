# Sourced by the study scripts (experiments/*_study.sh) after they set TIMES.
# timed NAME CMD...: runs CMD, then appends "NAME<TAB>seconds" to $TIMES (a run stopped and
# resumed gets one line per attempt; the table scripts add them up).
timed() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  "$@"
  echo -e "$name\t$((SECONDS - start))" >> "$TIMES"
}
