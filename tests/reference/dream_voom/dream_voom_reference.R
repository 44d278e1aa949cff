## An R re-implementation of variancePartition's voomWithDreamWeights (its source, R/voomWithDreamWeights.R
## and R/fitMixedModel.R of github.com/DiseaseNeuroGenomics/variancePartition, followed step by step)
## with lme4, on the simulated pseudobulk counts of tests/reference/voom.  variancePartition itself is
## not installable here (no Debian package).  Differences from the package: lme4 is run with tight
## bobyqa tolerances (tight_ctrl()) instead of variancePartition's default control, so that the
## numbers are the optimum rather than an optimiser's stopping point.
## Run from the repository root: Rscript tests/reference/dream_voom/dream_voom_reference.R
suppressPackageStartupMessages({ library(lme4); library(limma) })
source("tests/reference/common.R")
dir <- "tests/reference/dream_voom"
vdir <- "tests/reference/voom"

counts <- as.matrix(read.csv(file.path(vdir, "counts.csv.gz"), row.names = 1, check.names = FALSE))
samples <- read.csv(file.path(vdir, "samples.csv"), row.names = 1, stringsAsFactors = TRUE)

voom_dream <- function(counts, formula, data, weights = NULL, REML = FALSE,
                       rescaleWeightsAfter = FALSE, span = 0.5) {
  lib.size <- colSums(counts)
  y <- t(log2(t(counts + 0.5) / (lib.size + 1) * 1e6))          # prior.count 0.5, not scaled by lib
  if (is.null(weights)) weights <- rep(1, ncol(y))
  W <- if (is.matrix(weights)) weights else matrix(weights, nrow(y), ncol(y), byrow = TRUE)
  W <- W / rowMeans(W)                                          # input weights: mean 1 per gene
  sigma <- numeric(nrow(y)); fitted <- matrix(NA, nrow(y), ncol(y))
  form <- update(formula, y.local ~ .)
  for (i in seq_len(nrow(y))) {
    d <- data
    d$y.local <- y[i, ]
    d$w.local <- W[i, ] / mean(W[i, ])                          # run_lmm_on_gene: rescaleWeights
    fit <- lmer(form, d, weights = w.local, REML = REML, control = tight_ctrl())
    sigma[i] <- sigma(fit)
    fitted[i, ] <- predict(fit)                                 # includes the random effects
  }
  Amean <- rowMeans(y)
  sx <- Amean + mean(log2(lib.size + 1)) - log2(1e6)
  sy <- sqrt(sigma)
  allzero <- rowSums(counts) == 0
  l <- lowess(sx[!allzero], sy[!allzero], f = span)
  f <- approxfun(l, rule = 2)
  fitted.logcount <- log2(1e-6 * t(t(2^fitted) * (lib.size + 1)))
  w <- 1 / f(fitted.logcount)^4
  dim(w) <- dim(fitted.logcount)
  if (rescaleWeightsAfter) w <- W * w
  dimnames(w) <- dimnames(y)
  list(E = y, weights = w, sigma = sigma, line = l)
}

write_matrix <- function(m, name) {
  df <- data.frame(gene = rownames(m), m, check.names = FALSE)
  for (j in 2:ncol(df)) df[[j]] <- fmt17(df[[j]])
  con <- gzfile(file.path(dir, name), "w")
  on.exit(close(con))
  write.table(df, con, sep = ",", quote = FALSE, row.names = FALSE, col.names = TRUE)
}

form <- ~ trt + cls + (1 | sam)
## 1. defaults (ML, no input weights)
a <- voom_dream(counts, form, samples)
write_matrix(a$weights, "default_weights.csv.gz")
write_ref(data.frame(gene = rownames(counts), sigma = a$sigma), file.path(dir, "default_sigma.csv"))
## 2. REML with sample weights
sw <- seq(0.5, 2, length.out = ncol(counts))
write_ref(data.frame(sample = colnames(counts), w = sw), file.path(dir, "sample_weights.csv"))
b <- voom_dream(counts, form, samples, weights = sw, REML = TRUE)
write_matrix(b$weights, "reml_sample_weights.csv.gz")
write_ref(data.frame(gene = rownames(counts), sigma = b$sigma), file.path(dir, "reml_sample_sigma.csv"))
## 3. limma's voom weights as input (a gene x sample matrix), rescaled after
v <- voom(counts, model.matrix(~ trt + cls, samples))
cc <- voom_dream(counts, form, samples, weights = v$weights, rescaleWeightsAfter = TRUE)
write_matrix(cc$weights, "matrix_rescaled_weights.csv.gz")

writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("limma", packageVersion("limma"))), file.path(dir, "versions.txt"))
