## lmerTest references for results.ranova(): simulates a small multi-gene study
## (fixed seed), writes it to cells.csv and, for every gene and random-effects
## design, writes lmerTest's ranova table. Run from the repository root:
##   Rscript tests/reference/ranova/ranova_reference.R
suppressMessages({library(lme4); library(lmerTest)})
source("tests/reference/common.R")
out <- "tests/reference/ranova"

## ------------------------------------------------------------- simulation
set.seed(20261203)
n_donor <- 12; n_per <- 8; cts <- c("A", "B", "C"); n_genes <- 8
cells <- expand.grid(rep = seq_len(n_per), ct = cts, donor = sprintf("D%02d", seq_len(n_donor)),
                     stringsAsFactors = FALSE)[, c("donor", "ct")]
n <- nrow(cells)
cells$trt <- ifelse(as.integer(substr(cells$donor, 2, 3)) %% 2 == 0, "C", "T")
cells$batch <- sample(c("b1", "b2", "b3", "b4"), n, replace = TRUE)
cells$x <- round(rnorm(n, 0, 1), 6)
donor_id <- as.integer(factor(cells$donor)); ct_id <- as.integer(factor(cells$ct))
batch_id <- as.integer(factor(cells$batch))
## genes 1-4 have a donor:ct effect, odd genes a batch effect, genes 1, 2, 5 a random slope of x;
## every gene a donor intercept (genes 7, 8 a weak one)
for (g in seq_len(n_genes)) {
  b_ct <- c(0, rnorm(2, 0, 0.6)); b_trt <- rnorm(1, 0, 0.5); b_x <- rnorm(1, 0, 0.3)
  sd_d <- if (g >= 7) 0.15 else 0.7
  sd_dc <- if (g <= 4) 0.5 else 0; sd_b <- if (g %% 2 == 1) 0.6 else 0
  sd_s <- if (g %in% c(1, 2, 5)) 0.4 else 0
  u_d <- rnorm(n_donor, 0, sd_d); u_dc <- rnorm(n_donor * 3, 0, sd_dc); u_b <- rnorm(4, 0, sd_b)
  u_s <- rnorm(n_donor, 0, sd_s)
  y <- 2 + b_ct[ct_id] + (cells$trt == "T") * b_trt + (b_x + u_s[donor_id]) * cells$x +
    u_d[donor_id] + u_dc[(donor_id - 1) * 3 + ct_id] + u_b[batch_id] + rnorm(n, 0, 1)
  cells[[sprintf("g%02d", g)]] <- round(y, 6)
}
write_ref(cells, file.path(out, "cells.csv"))
genes <- sprintf("g%02d", seq_len(n_genes))
cells$ct <- factor(cells$ct); cells$trt <- factor(cells$trt)
cells$donor <- factor(cells$donor); cells$batch <- factor(cells$batch)

## ------------------------------------------------------------- models
random <- list(one = "(1 | donor)",
               nested = "(1 | donor) + (1 | donor:ct)",
               crossed = "(1 | donor) + (1 | batch)",
               three = "(1 | donor) + (1 | donor:ct) + (1 | batch)",
               slopes = "(1 + x | donor)",
               slopes_nested = "(1 + x | donor) + (1 | donor:ct)",
               indep = "(1 + x || donor)",
               nested_ML = "(1 | donor) + (1 | donor:ct)",   # fitted by ML
               one_ML = "(1 | donor)")
fixed <- "ct * trt + x"
rows <- list(); fit_rows <- list()
for (design in names(random)) for (gene in genes) {
  form <- as.formula(paste(gene, "~", fixed, "+", random[[design]]))
  reml <- !grepl("_ML$", design)
  fc <- fit_capture(lmer(form, data = cells, REML = reml, control = tight_ctrl()))
  fit <- fc$fit
  rc <- fit_capture(ranova(fit))
  tab <- rc$fit
  fit_rows[[length(fit_rows) + 1]] <- data.frame(
    design = design, gene = gene, singular = isSingular(fit, tol = 1e-4),
    messages = conv_messages(fit, c(fc$msgs, rc$msgs)), stringsAsFactors = FALSE)
  rows[[length(rows) + 1]] <- data.frame(
    design = design, gene = gene, term = rownames(tab), npar = tab$npar, logLik = tab$logLik,
    AIC = tab$AIC, LRT = tab$LRT, Df = tab$Df, pvalue = tab[["Pr(>Chisq)"]],
    stringsAsFactors = FALSE)
}
write_ref(do.call(rbind, rows), file.path(out, "ranova.csv"))
write_ref(do.call(rbind, fit_rows), file.path(out, "fits.csv"))
writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("lmerTest", packageVersion("lmerTest")),
             paste("Matrix", packageVersion("Matrix"))), file.path(out, "versions.txt"))
