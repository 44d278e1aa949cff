## Reference fits from lme4 / lmerTest for lme4's sleepstudy data.
## Run from the repository root:  Rscript tests/reference/sleepstudy_reference.R
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "common.R"))
outdir <- file.path(here, "sleepstudy")
dir.create(outdir, showWarnings = FALSE)

data("sleepstudy", package = "lme4")
ss <- sleepstudy
ss$Subject <- as.character(ss$Subject)
write_ref(ss[, c("Subject", "Days", "Reaction")], file.path(outdir, "sleepstudy.csv"))
sleepstudy$Subject <- factor(sleepstudy$Subject)

models <- list(
  corr = Reaction ~ Days + (Days | Subject),
  diag = Reaction ~ Days + (Days || Subject)
)
status <- list()
for (mname in names(models)) {
  for (reml in c(TRUE, FALSE)) {
    meth <- if (reml) "REML" else "ML"
    prefix <- file.path(outdir, sprintf("sleepstudy_%s_%s_", mname, meth))
    r <- fit_capture(lme4::lmer(models[[mname]], data = sleepstudy, REML = reml,
                                control = tight_ctrl()))
    fit <- r$fit
    ## fixed effects, se, Satterthwaite df
    r2 <- fit_capture(lmerTest::lmer(models[[mname]], data = sleepstudy, REML = reml,
                                     control = tight_ctrl()))
    fit2 <- r2$fit
    stopifnot(isTRUE(all.equal(fixef(fit2), fixef(fit), tolerance = 1e-10)))
    cf <- summary(fit2, ddf = "Satterthwaite")$coefficients
    write_ref(data.frame(term = names(fixef(fit)), estimate = unname(fixef(fit)),
                         se = unname(sqrt(diag(as.matrix(vcov(fit))))),
                         df = unname(cf[names(fixef(fit)), "df"]),
                         t = unname(cf[names(fixef(fit)), "t value"]),
                         p = unname(cf[names(fixef(fit)), "Pr(>|t|)"])),
              paste0(prefix, "fixef.csv"))
    ## variance components
    vcdf <- as.data.frame(VarCorr(fit))
    var_int <- vcdf$vcov[is.na(vcdf$var2) & vcdf$var1 %in% "(Intercept)" & vcdf$grp != "Residual"]
    var_days <- vcdf$vcov[is.na(vcdf$var2) & vcdf$var1 %in% "Days"]
    cov_id <- vcdf$vcov[!is.na(vcdf$var2)]
    if (length(cov_id) == 0) cov_id <- 0
    th <- getME(fit, "theta")
    ll <- logLik(fit)
    write_ref(data.frame(
      var_intercept = var_int, var_days = var_days, cov_intercept_days = cov_id,
      residual = sigma(fit)^2,
      loglik = as.numeric(ll),
      criterion = if (reml) REMLcrit(fit) else deviance(fit),
      criterion_type = if (reml) "REMLcrit" else "deviance",
      npar = as.integer(attr(ll, "df")), nobs = as.integer(nobs(fit)),
      singular = as.integer(isSingular(fit, tol = 1e-4)),
      theta = paste(fmt17(th), collapse = ";"),
      messages = conv_messages(fit, r$msgs), stringsAsFactors = FALSE),
      paste0(prefix, "vc.csv"))
    ## BLUPs and conditional covariance per subject (2x2, flattened)
    re <- ranef(fit, condVar = TRUE)$Subject
    subj <- rownames(re)
    ## full conditional covariance; the random-effect vector is ordered
    ## per term then per level: for 'corr' (Int_1, Days_1, Int_2, Days_2, ...),
    ## for 'diag' (Int_1..Int_n, Days_1..Days_n).
    CV <- full_condvar(fit)
    n <- length(subj)
    idx <- if (mname == "corr") lapply(seq_len(n), function(i) c(2 * i - 1, 2 * i))
           else lapply(seq_len(n), function(i) c(i, n + i))
    cv <- t(sapply(idx, function(ii) { M <- CV[ii, ii]; c(M[1, 1], M[1, 2], M[2, 2]) }))
    ## check against lme4's own postVar where available
    pv <- attr(re, "postVar")
    if (is.list(pv)) {  # separate terms: list of 1x1xn arrays
      chk <- cbind(pv[[1]][1, 1, ], pv[[2]][1, 1, ])
      stopifnot(isTRUE(all.equal(unname(chk), unname(cv[, c(1, 3)]), tolerance = 1e-8)))
    } else if (!is.null(pv) && dim(pv)[1] == 2) {
      chk <- t(apply(pv, 3, function(M) c(M[1, 1], M[1, 2], M[2, 2])))
      cols <- if (mname == "corr") 1:3 else c(1, 3)
      stopifnot(isTRUE(all.equal(unname(chk[, cols]), unname(cv[, cols]), tolerance = 1e-8)))
    }
    write_ref(data.frame(Subject = subj, intercept = re[, "(Intercept)"], days = re[, "Days"],
                         condvar_intercept = cv[, 1], condcov_intercept_days = cv[, 2],
                         condvar_days = cv[, 3]),
              paste0(prefix, "ranef.csv"))
    status[[length(status) + 1]] <- data.frame(model = mname, method = meth,
      messages = conv_messages(fit, r$msgs), lmerTest_messages = conv_messages(fit2, r2$msgs))
    print(summary(fit2))
  }
}
print(do.call(rbind, status))
writeLines(c(sprintf("R %s", getRversion()),
             sprintf("lme4 %s", packageVersion("lme4")),
             sprintf("lmerTest %s", packageVersion("lmerTest")),
             sprintf("Matrix %s", packageVersion("Matrix")),
             sprintf("minqa %s", packageVersion("minqa"))),
           file.path(outdir, "versions.txt"))
