## Kenward-Roger for lmer(weights = w): pbkrtest's vcovAdj ignores the weights (its residual
## covariance is the identity), so its internal routine is called with V's linear pieces written
## out: G_r = Z_r Z_r' per random term and G_res = diag(1 / w), at lme4's REML estimates. Writes
## kr_weighted.csv (vcovAdj entries and Lb_ddf per coefficient) for both models of
## weighted_lmm_reference.R. Run from the repository root:
##   Rscript tests/reference/weighted_lmm/kr_weighted_reference.R
suppressPackageStartupMessages({ library(lme4); library(pbkrtest); library(Matrix) })
source("tests/reference/common.R")
dir <- "tests/reference/weighted_lmm"
samples <- read.csv(file.path(dir, "samples.csv"), stringsAsFactors = TRUE)
samples$trt <- factor(samples$trt, levels = c("ctrl", "case"))
expr <- as.matrix(read.csv(file.path(dir, "expr.csv"), row.names = 1))
wts <- as.matrix(read.csv(file.path(dir, "weights.csv"), row.names = 1))
models <- list(donor = y ~ trt + celltype + (1 | donor),
               donor_plate = y ~ trt + celltype + (1 | donor) + (1 | plate))
rows <- list()
for (mname in names(models)) for (g in colnames(expr)) {
  d <- samples; d$y <- expr[, g]; d$w <- wts[, g]
  fit <- fit_capture(lmer(models[[mname]], data = d, weights = w, REML = TRUE,
                          control = tight_ctrl()))$fit
  vc <- as.data.frame(VarCorr(fit))
  Zt <- getME(fit, "Ztlist")
  G <- lapply(Zt, function(z) t(z) %*% z)
  G <- c(G, list(Diagonal(x = 1 / d$w)))
  gam <- c(vc$vcov[match(sub("\\.\\(Intercept\\)", "", names(Zt)), vc$grp)], sigma(fit)^2)
  Sigma <- Reduce(`+`, Map(`*`, gam, G))
  SigmaG <- list(Sigma = Sigma, G = G, n.ggamma = length(G))
  X <- getME(fit, "X")
  Phi <- as.matrix(vcov(fit))
  Vadj <- pbkrtest:::vcovAdj_internal(Matrix(Phi), SigmaG, X)
  p <- ncol(X); nm <- colnames(X)
  df <- sapply(seq_len(p), function(j) { L <- matrix(0, 1, p); L[j] <- 1; Lb_ddf(L, Phi, Vadj) })
  rows[[length(rows) + 1]] <- data.frame(
    model = mname, gene = g, singular = isSingular(fit, tol = 1e-4), row = rep(nm, p),
    col = rep(nm, each = p), vcov = as.vector(Phi), vcov_adj = as.vector(as.matrix(Vadj)),
    df_row = rep(df, p), stringsAsFactors = FALSE)
}
write_ref(do.call(rbind, rows), file.path(dir, "kr_weighted.csv"))
