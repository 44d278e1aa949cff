## lmerTest references for results.anova() and results.ls_means():
## simulates a small multi-gene study (fixed seed), writes it to cells.csv and,
## for every gene, random-effects design and formula, writes lmerTest's anova
## tables (types 1, 2, 3), ls_means / difflsmeans and a few explicit contestMD
## tests. Run from the repository root:
##   Rscript tests/reference/anova/anova_reference.R
suppressMessages({library(lme4); library(lmerTest)})
source("tests/reference/common.R")
out <- "tests/reference/anova"

## ------------------------------------------------------------- simulation
set.seed(20261202)
n_donor <- 10; n_per <- 10; cts <- c("A", "B", "C"); n_genes <- 6
cells <- expand.grid(rep = seq_len(n_per), ct = cts, donor = sprintf("D%02d", seq_len(n_donor)),
                     stringsAsFactors = FALSE)[, c("donor", "ct")]
n <- nrow(cells)
cells$trt <- ifelse(as.integer(substr(cells$donor, 2, 3)) %% 2 == 0, "C", "T")
cells$batch <- sample(c("b1", "b2", "b3"), n, replace = TRUE)
cells$x <- round(rnorm(n, 1, 0.8), 6)
donor_id <- as.integer(factor(cells$donor)); ct_id <- as.integer(factor(cells$ct))
batch_id <- as.integer(factor(cells$batch))
for (g in seq_len(n_genes)) {
  b_ct <- c(0, rnorm(2, 0, 0.6)); b_trt <- rnorm(1, 0, 0.6)
  b_int <- c(0, rnorm(2, 0, 0.4)) * (g %% 2); b_x <- rnorm(1, 0, 0.3)
  u_d <- rnorm(n_donor, 0, 0.7); u_dc <- rnorm(n_donor * 3, 0, 0.5); u_b <- rnorm(3, 0, 0.6)
  y <- 2 + b_ct[ct_id] + (cells$trt == "T") * (b_trt + b_int[ct_id]) + b_x * cells$x +
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
               nested_ML = "(1 | donor) + (1 | donor:ct)")   # fitted by ML
fixed <- list(main = "ct * trt + x",          # types 2, 3, ls_means (type 1: R orders x first)
              order = "ct * trt + x:trt",     # R's and patsy's term order agree: types 1, 2, 3
              nointercept = "0 + ct + ct:trt",
              nomain = "ct + ct:trt + x",
              xfirst = "x + ct + ct:trt")     # type 1 of ct after x: flashmm's type 2 of nomain
special <- c("nointercept", "nomain", "xfirst")

anova_rows <- list(); ls_rows <- list(); contest_rows <- list(); fit_rows <- list()
tidy_anova <- function(tab, design, fid, gene, type) {
  data.frame(design = design, formula = fid, gene = gene, type = type, term = rownames(tab),
             sum_sq = tab[["Sum Sq"]], mean_sq = tab[["Mean Sq"]], num_df = tab[["NumDF"]],
             den_df = tab[["DenDF"]], F = tab[["F value"]], pvalue = tab[["Pr(>F)"]],
             stringsAsFactors = FALSE)
}
tidy_ls <- function(tab, design, fid, gene, pairwise) {
  d <- as.data.frame(tab, add_levels = TRUE)
  data.frame(design = design, formula = fid, gene = gene, pairwise = pairwise,
             term = d$term, level = d$levels, estimate = d$Estimate, se = d[["Std. Error"]],
             df = d$df, t = d[["t value"]], pvalue = d[["Pr(>|t|)"]], lower = d$lower,
             upper = d$upper, stringsAsFactors = FALSE)
}
for (design in names(random)) {
  fids <- if (design %in% c("one", "nested")) names(fixed) else
    if (design == "nested_ML") "main" else c("main", "order")
  for (fid in fids) for (gene in genes) {
    form <- as.formula(paste(gene, "~", fixed[[fid]], "+", random[[design]]))
    fc <- fit_capture(lmer(form, data = cells, REML = design != "nested_ML",
                               control = tight_ctrl()))
    fit <- fc$fit
    fit_rows[[length(fit_rows) + 1]] <- data.frame(
      design = design, formula = fid, gene = gene, singular = isSingular(fit, tol = 1e-4),
      sigma2 = sigma(fit)^2, messages = conv_messages(fit, fc$msgs), stringsAsFactors = FALSE)
    for (type in 1:3) {
      tab <- suppressMessages(anova(fit, type = type))
      anova_rows[[length(anova_rows) + 1]] <- tidy_anova(tab, design, fid, gene, type)
    }
    if (fid == "main") {
      for (trm in c("ct", "trt", "ct:trt")) {
        ls_rows[[length(ls_rows) + 1]] <- tidy_ls(ls_means(fit, which = trm), design, fid, gene, FALSE)
        ls_rows[[length(ls_rows) + 1]] <- tidy_ls(difflsmeans(fit, which = trm), design, fid, gene, TRUE)
      }
    }
    if (fid == "nointercept") {
      ## the cell-type means averaged over trt are 0 (flashmm's type 3 row of ct)
      L <- cbind(diag(3), 0.5 * diag(3))
      tab <- contestMD(fit, L)
      contest_rows[[length(contest_rows) + 1]] <- data.frame(
        design = design, formula = fid, gene = gene, name = "ct_avg_over_trt",
        num_df = tab$NumDF, den_df = tab$DenDF, F = tab[["F value"]], pvalue = tab[["Pr(>F)"]])
    }
  }
}
write_ref(do.call(rbind, anova_rows), file.path(out, "anova.csv"))
write_ref(do.call(rbind, ls_rows), file.path(out, "lsmeans.csv"))
write_ref(do.call(rbind, contest_rows), file.path(out, "contest.csv"))
write_ref(do.call(rbind, fit_rows), file.path(out, "fits.csv"))
writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("lmerTest", packageVersion("lmerTest")),
             paste("Matrix", packageVersion("Matrix"))), file.path(out, "versions.txt"))
