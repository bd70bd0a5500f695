# Mean and sample standard deviation of the number columns over the rows of
# a CSV (the example's --csv rows) that share a key, one output row per key
# in the order first met. Variables:
#   key   the key's column names, comma-separated
#   from  the first number column's name; the numbers run from there to
#         the last column, leaving out the columns of words ("model",
#         "embeddings")
# Output: the key's columns, "seeds" (the rows per key), then NAME_mean and
# NAME_std for each number column.
BEGIN { FS = "," }
NR == 1 {
  n = split($0, head, ",")
  for (i = 1; i <= n; i++) col[head[i]] = i
  last = n
  words["model"]; words["embeddings"]
  k = split(key, names, ",")
  next
}
{
  id = $(col[names[1]])
  for (j = 2; j <= k; j++) id = id "," $(col[names[j]])
  if (!(id in count)) order[++keys] = id
  count[id]++
  for (i = col[from]; i <= last; i++) if (!(head[i] in words)) {
    sum[id, i] += $i; sq[id, i] += $i * $i }
}
END {
  printf "%s,seeds", key
  for (i = col[from]; i <= last; i++) if (!(head[i] in words))
    printf ",%s_mean,%s_std", head[i], head[i]
  printf "\n"
  for (r = 1; r <= keys; r++) {
    id = order[r]; c = count[id]; printf "%s,%d", id, c
    for (i = col[from]; i <= last; i++) if (!(head[i] in words)) {
      m = sum[id, i] / c
      v = c > 1 ? (sq[id, i] - c * m * m) / (c - 1) : 0
      printf ",%.6g,%.6g", m, (v > 0 ? sqrt(v) : 0)
    }
    printf "\n"
  }
}
