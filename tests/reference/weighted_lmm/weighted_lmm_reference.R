## lme4's lmer(weights = w) + lmerTest on simulated pseudobulk samples with precision weights.
## Run from the repository root: Rscript tests/reference/weighted_lmm/weighted_lmm_reference.R
suppressPackageStartupMessages({ library(lme4); library(lmerTest) })
source("tests/reference/common.R")
dir <- "tests/reference/weighted_lmm"

samples <- read.csv(file.path(dir, "samples.csv"), stringsAsFactors = TRUE)
samples$trt <- factor(samples$trt, levels = c("ctrl", "case"))
expr <- as.matrix(read.csv(file.path(dir, "expr.csv"), row.names = 1))
wts <- as.matrix(read.csv(file.path(dir, "weights.csv"), row.names = 1))
genes <- colnames(expr)

models <- list(
  donor = y ~ trt + celltype + (1 | donor),
  donor_plate = y ~ trt + celltype + (1 | donor) + (1 | plate)
)

for (mname in names(models)) {
  for (reml in c(TRUE, FALSE)) {
    rows <- list()
    for (g in genes) {
      d <- samples
      d$y <- expr[, g]
      d$w <- wts[, g]
      fit <- fit_capture(lmer(models[[mname]], data = d, weights = w, REML = reml,
                              control = tight_ctrl()))$fit
      cf <- summary(fit)$coefficients          # lmerTest: Estimate, SE, df, t, p
      vc <- as.data.frame(VarCorr(fit))
      row <- data.frame(gene = g, loglik = as.numeric(logLik(fit)),
                        sigma2 = sigma(fit)^2, singular = isSingular(fit, tol = 1e-4))
      for (k in seq_len(nrow(cf))) {
        nm <- c("Intercept", "trtcase", "celltypec1", "celltypec2")[k]
        row[[paste0("coef_", nm)]] <- cf[k, "Estimate"]
        row[[paste0("se_", nm)]] <- cf[k, "Std. Error"]
        row[[paste0("df_", nm)]] <- cf[k, "df"]
        row[[paste0("p_", nm)]] <- cf[k, "Pr(>|t|)"]
      }
      for (grp in setdiff(vc$grp, "Residual")) row[[paste0("var_", grp)]] <- vc$vcov[vc$grp == grp]
      ct <- contest1D(fit, c(0, 1, 0.5, -0.5))  # a contrast mixing treatment and cell types
      row$contrast_est <- ct$Estimate; row$contrast_se <- ct$`Std. Error`
      row$contrast_df <- ct$df
      re <- ranef(fit)$donor[, 1]
      names(re) <- rownames(ranef(fit)$donor)
      row$blup_D00 <- re[["D00"]]
      pv <- attr(ranef(fit, condVar = TRUE)$donor, "postVar")
      row$condvar_D00 <- pv[1, 1, which(rownames(ranef(fit)$donor) == "D00")]
      row$fitted_S00 <- fitted(fit)[[1]]
      rows[[g]] <- row
    }
    out <- do.call(rbind, rows)
    write_ref(out, file.path(dir, sprintf("lmer_%s_%s.csv", mname, if (reml) "REML" else "ML")))
  }
}

writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("lmerTest", packageVersion("lmerTest")),
             paste("Matrix", packageVersion("Matrix"))), file.path(dir, "versions.txt"))
