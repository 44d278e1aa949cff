# FLASHMM's own simulator and summary statistics, for benchmarks/bench_sslmm.py.
#
# Calls the R package FLASHMM (simuRNAseq, sslmm); no FLASHMM code is copied.
#
# Usage:
#   Rscript benchmarks/bench_sslmm.R simulate [DIR] [GENES] [CELLS]
#       Simulates with simuRNAseq (default 2,000 genes x 100,000 cells) from a
#       reference drawn with rnbinom (fixed seeds) and writes to DIR (default
#       /tmp/sslmm_data):
#         counts_int32.bin  the genes x cells counts, column-major little-endian
#                           int32 (read as a row-major cells x genes array)
#         metadata.csv      cell, sam, cls, trt, libsize (one row per cell)
#         genes.txt         gene names, one per line
#         info.json         sizes, non-zero fraction, seeds, parameters, timing
#   Rscript benchmarks/bench_sslmm.R time [DIR] [N]
#       Loads DIR, builds Y = log(1 + counts) (dense genes x cells matrix),
#       X = model.matrix(~ 0 + log(libsize) + cls + cls:trt) and
#       Z = model.matrix(~ 0 + sam), times sslmm(X, Y, Z) N times (default 3;
#       elapsed seconds of system.time, which runs gc() first) and prints JSON;
#       writes the statistics of the last run to DIR/sslmm_stats/.
#   Rscript benchmarks/bench_sslmm.R serve [DIR]
#       Loads DIR as above, prints one JSON line, then reads commands from
#       stdin, one per line: "time" (one timed sslmm, one JSON line), "dump"
#       (one untimed sslmm, statistics written to DIR/sslmm_stats/, one JSON
#       line) or "quit".  Lets the caller interleave R and Python timings in
#       one R session.
#
# Only the call to sslmm is timed: not the simulation, the loading, the
# transform or the design matrices.

suppressPackageStartupMessages({
  library(FLASHMM)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
mode <- if (length(args) >= 1) args[[1]] else "simulate"
dir <- if (length(args) >= 2) args[[2]] else "/tmp/sslmm_data"

emit <- function(x) {
  cat(toJSON(x, auto_unbox = TRUE, digits = NA, null = "null"), "\n", sep = "")
  flush(stdout())
}

blas_info <- function() {
  list(R = R.version.string, FLASHMM = as.character(packageVersion("FLASHMM")),
       Matrix = as.character(packageVersion("Matrix")),
       BLAS = unname(extSoftVersion()[["BLAS"]]), LAPACK = La_library(),
       env = as.list(Sys.getenv(c("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                  "MKL_NUM_THREADS", "R_MATPROD"), unset = NA)),
       matprod = getOption("matprod"))
}

simulate <- function(dir, n_genes, n_cells) {
  dir.create(dir, showWarnings = FALSE, recursive = TRUE)
  t0 <- proc.time()[["elapsed"]]
  # Reference counts, genes x cells, drawn as simuRNAseq draws its own default
  # reference (mu = 1 + Pois, size = 1 + Pois per gene) with the mean's Poisson
  # parameter chosen so that about 67% of the simulated counts are non-zero.
  n_ref <- 10000L
  lambda_mu <- 0.9
  set.seed(2502)
  mu <- 1 + rpois(n_genes, lambda = lambda_mu)
  size <- 1 + rpois(n_genes, lambda = 1)
  ref <- matrix(rnbinom(n_genes * n_ref, size = size, mu = mu), nrow = n_genes)
  colnames(ref) <- paste0("Cell", seq_len(n_ref))
  rownames(ref) <- paste0("Gene", seq_len(n_genes))
  ref_nonzero <- mean(ref > 0)
  # The study, as in FLASHMM's vignette: 25 samples (nested in the 2
  # treatments), 10 cell types, cell-type-specific DE genes.
  set.seed(2503)
  n_de <- 100L
  dat <- simuRNAseq(ref, nGenes = n_genes, nCells = n_cells, nsam = 25, ncls = 10,
                    ntrt = 2, nDEgenes = n_de)
  rm(ref)
  counts <- dat$counts
  t_sim <- proc.time()[["elapsed"]] - t0
  nnz <- sum(counts > 0)
  storage.mode(counts) <- "integer"
  con <- file(file.path(dir, "counts_int32.bin"), "wb")
  writeBin(as.vector(counts), con, size = 4L, endian = "little")
  close(con)
  meta <- data.frame(cell = rownames(dat$metadata), sam = dat$metadata$sam,
                     cls = dat$metadata$cls, trt = dat$metadata$trt,
                     libsize = dat$metadata$libsize)
  write.csv(meta, file.path(dir, "metadata.csv"), row.names = FALSE)
  writeLines(rownames(counts), file.path(dir, "genes.txt"))
  info <- list(
    n_genes = nrow(counts), n_cells = ncol(counts), nnz = nnz,
    nonzero_fraction = nnz / (as.numeric(nrow(counts)) * ncol(counts)),
    max_count = max(counts), n_samples = length(unique(meta$sam)),
    n_celltypes = length(unique(meta$cls)), treated = dat$treatment,
    n_de_genes = nrow(dat$DEgenes),
    reference = list(n_cells = n_ref, mu = sprintf("1 + rpois(%d, %g)", n_genes, lambda_mu),
                     size = sprintf("1 + rpois(%d, 1)", n_genes), seed = 2502,
                     nonzero_fraction = ref_nonzero),
    simuRNAseq = list(call = sprintf(paste0(
      "simuRNAseq(ref, nGenes = %d, nCells = %d, nsam = 25, ncls = 10, ntrt = 2, ",
      "nDEgenes = %d)"), n_genes, n_cells, n_de), seed = 2503),
    layout = "counts_int32.bin: genes x cells column-major int32 = cells x genes row-major",
    simulation_seconds = t_sim, software = blas_info())
  write(toJSON(info, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path(dir, "info.json"))
  emit(info)
}

load_study <- function(dir) {
  t0 <- proc.time()[["elapsed"]]
  info <- fromJSON(file.path(dir, "info.json"))
  g <- info$n_genes
  n <- info$n_cells
  con <- file(file.path(dir, "counts_int32.bin"), "rb")
  counts <- readBin(con, "integer", n = as.numeric(g) * n, size = 4L, endian = "little")
  close(con)
  # Y = log(1 + counts), a dense genes x cells matrix (FLASHMM's docs)
  Y <- matrix(log1p(counts), nrow = g, ncol = n)
  rm(counts)
  meta <- read.csv(file.path(dir, "metadata.csv"),
                   colClasses = c("character", "character", "character", "character", "numeric"))
  rownames(meta) <- meta$cell
  colnames(Y) <- meta$cell
  rownames(Y) <- readLines(file.path(dir, "genes.txt"))
  X <- model.matrix(~ 0 + log(libsize) + cls + cls:trt, data = meta)
  Z <- model.matrix(~ 0 + sam, data = meta)
  invisible(gc())
  list(X = X, Y = Y, Z = Z, load_seconds = proc.time()[["elapsed"]] - t0)
}

one_timing <- function(s) {
  t <- system.time(ss <- sslmm(s$X, s$Y, s$Z), gcFirst = TRUE)
  list(seconds = round(t[["elapsed"]], 3), user = round(t[["user.self"]], 3),
       system = round(t[["sys.self"]], 3), ss = ss)
}

dump_stats <- function(ss, s, dir) {
  out <- file.path(dir, "sslmm_stats")
  dir.create(out, showWarnings = FALSE)
  shapes <- list()
  for (k in c("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")) {
    m <- as.matrix(ss[[k]])
    con <- file(file.path(out, paste0(k, ".bin")), "wb")
    writeBin(as.vector(m), con, size = 8L, endian = "little")
    close(con)
    shapes[[k]] <- dim(m)
  }
  meta <- list(n = ss$n, shapes = shapes, X_names = colnames(s$X), Z_names = colnames(s$Z),
               gene_names = rownames(s$Y),
               layout = "<name>.bin: column-major little-endian float64 of the R matrix")
  write(toJSON(meta, auto_unbox = TRUE, digits = NA), file.path(out, "meta.json"))
  out
}

default_blocks <- function(s) ceiling((ncol(s$Y) * 1e-08) * nrow(s$Y))

if (mode == "simulate") {
  n_genes <- if (length(args) >= 3) as.integer(args[[3]]) else 2000L
  n_cells <- if (length(args) >= 4) as.integer(args[[4]]) else 100000L
  simulate(dir, n_genes, n_cells)
} else if (mode == "time") {
  reps <- if (length(args) >= 3) as.integer(args[[3]]) else 3L
  s <- load_study(dir)
  runs <- lapply(seq_len(reps), function(i) one_timing(s))
  dump_stats(runs[[reps]]$ss, s, dir)
  emit(list(seconds = sapply(runs, `[[`, "seconds"), user = sapply(runs, `[[`, "user"),
            system = sapply(runs, `[[`, "system"), median = median(sapply(runs, `[[`, "seconds")),
            nBlocks = default_blocks(s), load_seconds = s$load_seconds,
            dim_Y = dim(s$Y), dim_X = dim(s$X), dim_Z = dim(s$Z), software = blas_info()))
} else if (mode == "serve") {
  s <- load_study(dir)
  emit(list(ready = TRUE, load_seconds = s$load_seconds, nBlocks = default_blocks(s),
            dim_Y = dim(s$Y), dim_X = dim(s$X), dim_Z = dim(s$Z), software = blas_info(),
            pid = Sys.getpid()))
  con <- file("stdin", "r")
  repeat {
    line <- readLines(con, n = 1L)
    if (length(line) == 0L || trimws(line) == "quit") break
    cmd <- trimws(line)
    if (cmd == "time") {
      r <- one_timing(s)
      emit(list(seconds = r$seconds, user = r$user, system = r$system))
      rm(r)
    } else if (cmd == "dump") {
      r <- one_timing(s)
      out <- dump_stats(r$ss, s, dir)
      emit(list(dumped = out, seconds = r$seconds))
      rm(r)
    } else {
      emit(list(error = paste("unknown command", cmd)))
    }
    invisible(gc())
  }
  close(con)
} else {
  stop("mode must be simulate, time or serve")
}
