## limma's voom, lmFit and eBayes on the simulated pseudobulk counts.
## Run from the repository root: Rscript tests/reference/voom/voom_reference.R
suppressPackageStartupMessages({ library(limma); library(edgeR) })
source("tests/reference/common.R")
dir <- "tests/reference/voom"

counts <- as.matrix(read.csv(file.path(dir, "counts.csv.gz"), row.names = 1, check.names = FALSE))
samples <- read.csv(file.path(dir, "samples.csv"), row.names = 1, stringsAsFactors = TRUE)
design <- model.matrix(~ trt + cls, data = samples)

write_matrix <- function(m, name) {
  df <- data.frame(gene = rownames(m), m, check.names = FALSE)
  con <- gzfile(file.path(dir, name), "w")
  on.exit(close(con))
  for (j in 2:ncol(df)) df[[j]] <- fmt17(df[[j]])
  write.table(df, con, sep = ",", quote = FALSE, row.names = FALSE, col.names = TRUE)
}

write_fit <- function(eb, prefix) {
  cn <- colnames(eb$coefficients)
  tab <- data.frame(gene = rownames(eb$coefficients), sigma = eb$sigma, Amean = eb$Amean,
                    df_residual = eb$df.residual, s2_post = eb$s2.post, df_total = eb$df.total)
  for (j in seq_along(cn)) {
    tab[[paste0("coef", j)]] <- eb$coefficients[, j]
    tab[[paste0("se", j)]] <- eb$stdev.unscaled[, j]
    tab[[paste0("t", j)]] <- eb$t[, j]
    tab[[paste0("p", j)]] <- eb$p.value[, j]
    tab[[paste0("lods", j)]] <- eb$lods[, j]
  }
  write_ref(tab, file.path(dir, paste0(prefix, "_fit.csv")))
  write_ref(data.frame(s2_prior = eb$s2.prior, df_prior = eb$df.prior),
            file.path(dir, paste0(prefix, "_prior.csv")))
}

write_voom <- function(v, prefix) {
  write_matrix(v$E, paste0(prefix, "_E.csv.gz"))
  w <- v$weights
  dimnames(w) <- dimnames(v$E)
  write_matrix(w, paste0(prefix, "_weights.csv.gz"))
  write_ref(data.frame(x = v$voom.line$x, y = v$voom.line$y),
            file.path(dir, paste0(prefix, "_line.csv")))
}

## 1. defaults: library sizes = column sums, span 0.5
v <- voom(counts, design, save.plot = TRUE)
write_voom(v, "default")
write_fit(eBayes(lmFit(v, design)), "default")

## 2. given (normalised) library sizes and span 0.3
lib <- colSums(counts) * samples$norm_factor
v2 <- voom(counts, design, lib.size = lib, span = 0.3, save.plot = TRUE)
write_voom(v2, "libsize")
write_fit(eBayes(lmFit(v2, design)), "libsize")

## 3. block GLS with a fixed correlation (weights and fit)
v3 <- voom(counts, design, block = samples$sam, correlation = 0.3, save.plot = TRUE)
write_voom(v3, "block")
write_fit(eBayes(lmFit(v3, design, block = samples$sam, correlation = 0.3)), "block")

## 4. the voom / duplicateCorrelation workflow (limma's user guide), gene-specific weights
dc1 <- duplicateCorrelation(v, design, block = samples$sam)
v4 <- voom(counts, design, block = samples$sam, correlation = dc1$consensus)
dc2 <- duplicateCorrelation(v4, design, block = samples$sam)
write_ref(data.frame(gene = rownames(counts), atanh1 = dc1$atanh.correlations,
                     atanh2 = dc2$atanh.correlations), file.path(dir, "dupcor_genes.csv"))
write_ref(data.frame(consensus1 = dc1$consensus, consensus2 = dc2$consensus),
          file.path(dir, "dupcor_consensus.csv"))
w4 <- v4$weights
dimnames(w4) <- dimnames(v4$E)
write_matrix(w4, "dupcor_weights.csv.gz")
eb4 <- eBayes(lmFit(v4, design, block = samples$sam, correlation = dc2$consensus))
write_fit(eb4, "dupcor")
## topTable of the block + correlation + voom-weights fit, in gene order
tt <- topTable(eb4, coef = "trtB", number = Inf, sort.by = "none")
write_ref(data.frame(gene = rownames(tt), tt, check.names = FALSE),
          file.path(dir, "dupcor_toptable.csv"))

## R's lowess alone: ties, outliers, iter and delta variants
lw <- read.csv(file.path(dir, "lowess_in.csv"))
out <- data.frame(x_sorted = lowess(lw$x, lw$y)$x)
out$f_default <- lowess(lw$x, lw$y)$y
out$f_0.3 <- lowess(lw$x, lw$y, f = 0.3)$y
out$iter_0 <- lowess(lw$x, lw$y, f = 0.5, iter = 0)$y
out$delta_0 <- lowess(lw$x, lw$y, f = 0.5, delta = 0)$y
out$delta_1 <- lowess(lw$x, lw$y, f = 0.5, delta = 1)$y
out$f_0.05 <- lowess(lw$x, lw$y, f = 0.05)$y
out$delta_0.5 <- lowess(lw$x, lw$y, f = 0.3, delta = 0.5)$y
write_ref(out, file.path(dir, "lowess_out.csv"))

writeLines(c(R.version.string, paste("limma", packageVersion("limma")),
             paste("edgeR", packageVersion("edgeR"))), file.path(dir, "versions.txt"))
