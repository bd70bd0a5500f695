# Accuracy under PGD against its radius, one panel per data set, one line per
# method (mean over seeds, error bars ± std). Run by sweep.sh with
#   gnuplot -e "outfile='...png'; dir='...'" plot.gp
set terminal pngcairo size 1400,560 font ",11"
set output outfile
set datafile separator whitespace
set key autotitle columnheader
set multiplot layout 1,2
set xlabel "PGD radius ε (L2 per embedded text, 10 steps)"
set ylabel "test accuracy (%)"
set grid
set key outside right
set yrange [0:100]
do for [dataset in "sentiment spamassassin"] {
  file = dir . "/curve_" . dataset . ".dat"
  set title dataset
  n = int(system("head -1 " . file . " | wc -w") - 1) / 2
  plot for [i=1:n] file using 1:(column(2*i)):(column(2*i+1)) \
    with yerrorlines lw 2 title columnhead(2*i)
}
unset multiplot
