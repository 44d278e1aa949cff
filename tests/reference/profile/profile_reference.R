## Profile-likelihood confidence intervals of the variance components from lme4.
## Run from the repository root:  Rscript tests/reference/profile/profile_reference.R
##
## For every model and gene it writes, for the standard deviations of the random
## effects and the residual sigma (lme4's .sig01, ..., .sigma):
##   * lme4's confint(profile(fit)) at levels 0.95 and 0.8 (spline interpolation
##     of the profile; lme4 always profiles the ML deviance, refitting a REML fit
##     by ML first), columns lme4_lower / lme4_upper; lme4_spline is FALSE where
##     confint warned "bad spline fit ...: falling back to linear interpolation";
##   * the exact roots of the same profiled ML deviance, found here with a tight
##     inner optimiser and uniroot, columns root_lower / root_upper: they measure
##     lme4's interpolation error;
##   * the exact roots of the profiled REML criterion (the intervals of a REML
##     fit when the REML criterion is profiled), file ..._REML.csv.
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "..", "common.R"))
outdir <- here

LEVELS <- c(0.95, 0.8)

## Deviance (ML) or REML criterion as a function of c(sd_1, ..., sd_k, sigma),
## the fixed effects profiled out: lme4's devfun2 for ML, the same construction
## with log|RX|^2 and n - p for REML. `fit` is fitted by ML or REML accordingly
## (with the tight control: lme4's own refitML uses the default tolerances).
sd_deviance <- function(fit, reml) {
  df <- getME(fit, "devfun")
  env <- environment(df)
  vlist <- lengths(fit@cnms)
  n <- length(getME(fit, "y"))
  p <- ncol(getME(fit, "X"))
  m <- if (reml) n - p else n
  dev <- function(pars) {
    sigma <- pars[length(pars)]
    th <- lme4:::Sv_to_Cv(pars, n = vlist, s = sigma)
    df(th)
    pwrss <- env$resp$wrss() + env$pp$sqrL(1)
    ld <- env$pp$ldL2() + if (reml) env$pp$ldRX2() else 0
    ld + pwrss / sigma^2 + m * log(2 * pi * sigma^2)
  }
  est <- as.numeric(lme4:::Cv_to_Sv(getME(fit, "theta"), n = vlist, s = sigma(fit)))
  list(dev = dev, est = est)
}

## Profiled deviance at pars[w] = x: the others minimised (bobyqa, or optimize in 1-d).
profile_at <- function(dd, w, x) {
  est <- dd$est
  k <- length(est)
  full <- function(others) { p <- numeric(k); p[w] <- x; p[-w] <- others; dd$dev(p) }
  start <- est[-w]
  if (length(start) == 1) {
    hi <- 20 * max(est)
    o <- optimize(full, c(1e-10 * hi, hi), tol = 1e-12 * hi)
    o2 <- optimize(full, c(1e-10 * hi, 2 * o$minimum + 1e-8 * hi), tol = 1e-13 * hi)
    at0 <- if (w == k) full(0) else Inf      # the other parameter is an sd: try 0
    return(min(o$objective, o2$objective, at0))
  }
  best <- Inf
  for (s in list(start, pmax(start, 0.05 * max(est)))) {
    o <- minqa::bobyqa(s, full, lower = rep(0, length(s)),
                       control = list(rhobeg = 0.1 * max(est), rhoend = 1e-11 * max(est),
                                      maxfun = 1e5))
    best <- min(best, o$fval)
  }
  best
}

## Exact limits where the signed root of the deviance difference equals -z and +z.
exact_limits <- function(dd, w, z) {
  est <- dd$est
  base <- dd$dev(est)
  zeta <- function(x) sign(x - est[w]) * sqrt(max(profile_at(dd, w, x) - base, 0))
  scale <- max(est)
  step <- 0.5 * max(est[w], 0.05 * scale)
  a <- est[w]; b <- est[w] + step
  while (zeta(b) < z) { a <- b; step <- 2 * step; b <- b + step }
  upper <- uniroot(function(x) zeta(x) - z, c(a, b), tol = 1e-11 * scale)$root
  is_sigma <- w == length(est)
  if (est[w] <= 0) {
    lower <- 0
  } else if (!is_sigma && zeta(0) > -z) {
    lower <- 0
  } else {
    b <- est[w]; a <- if (is_sigma) est[w] / 2 else 0
    if (is_sigma) while (zeta(a) > -z) { b <- a; a <- a / 2 }
    lower <- uniroot(function(x) zeta(x) + z, c(a, b), tol = 1e-11 * scale)$root
  }
  c(lower, upper)
}

## One model and gene: lme4's confint (ML profile) and the exact roots.
profile_rows <- function(fit, fit_ml, model, gene, names) {
  r <- fit_capture(profile(fit, which = "theta_", signames = FALSE))
  pr <- r$fit
  mld <- sd_deviance(fit_ml, reml = FALSE)
  rows <- list()
  for (lev in LEVELS) {
    cr <- fit_capture(confint(pr, level = lev))
    ci <- cr$fit
    spline_ok <- !vapply(rownames(ci), function(nm)
      any(grepl(nm, cr$msgs, fixed = TRUE) & grepl("linear interpolation", cr$msgs)), TRUE)
    z <- qnorm(1 - (1 - lev) / 2)
    for (w in seq_along(names)) {
      ex <- exact_limits(mld, w, z)
      rows[[length(rows) + 1]] <- data.frame(
        model = model, gene = gene, parameter = names[w], lme4_name = rownames(ci)[w],
        level = lev, estimate = mld$est[w], lme4_lower = ci[w, 1], lme4_upper = ci[w, 2],
        root_lower = ex[1], root_upper = ex[2], lme4_spline = spline_ok[w],
        warnings = gsub("[,\n\r]", ";", paste(unique(r$msgs), collapse = " | ")))
    }
  }
  do.call(rbind, rows)
}

reml_rows <- function(fit, model, gene, names) {
  rd <- sd_deviance(fit, reml = TRUE)
  rows <- list()
  for (lev in LEVELS) {
    z <- qnorm(1 - (1 - lev) / 2)
    for (w in seq_along(names)) {
      ex <- exact_limits(rd, w, z)
      rows[[length(rows) + 1]] <- data.frame(
        model = model, gene = gene, parameter = names[w], level = lev,
        estimate = rd$est[w], root_lower = ex[1], root_upper = ex[2])
    }
  }
  do.call(rbind, rows)
}

run_model <- function(formula, data, model, genes, names) {
  ml <- list(); re <- list()
  for (g in genes) {
    data$y <- data[[g]]
    fit <- lmer(formula, data = data, REML = TRUE, control = tight_ctrl())
    fit_ml <- lmer(formula, data = data, REML = FALSE, control = tight_ctrl())
    ml[[g]] <- profile_rows(fit, fit_ml, model, g, names)
    re[[g]] <- reml_rows(fit, model, g, names)
  }
  write_ref(do.call(rbind, ml), file.path(outdir, sprintf("%s_ML.csv", model)))
  write_ref(do.call(rbind, re), file.path(outdir, sprintf("%s_REML.csv", model)))
}

t0 <- proc.time()[["elapsed"]]
## sleepstudy (the data are in tests/reference/sleepstudy/sleepstudy.csv)
ss <- sleepstudy
run_model(y ~ Days + (1 | Subject), ss, "sleepstudy_intercept", "Reaction",
          c("Subject", "residual"))
run_model(y ~ Days + (Days || Subject), ss, "sleepstudy_diag", "Reaction",
          c("Subject", "Days", "residual"))

## Penicillin: crossed plate and sample (lme4 orders plate, 24 levels, first)
pen <- Penicillin
write_ref(data.frame(plate = as.character(pen$plate), sample = as.character(pen$sample),
                     diameter = as.numeric(pen$diameter)),
          file.path(outdir, "penicillin.csv"))
pen$diameter <- as.numeric(pen$diameter)
run_model(y ~ 1 + (1 | plate) + (1 | sample), pen, "penicillin", "diameter",
          c("plate", "sample", "residual"))

## simulated genes of tests/reference/lme4_sim (sam has 12 levels, loc 8: sam first)
cells <- read.csv(file.path(here, "..", "lme4_sim", "cells.csv"))
cells$sam <- factor(cells$sam); cells$loc <- factor(cells$loc)
sim_genes <- sprintf("g%02d", 1:6)
run_model(y ~ 0 + log(libsize) + cls + cls:trt + (1 | sam), cells, "sim_1comp", sim_genes,
          c("sam", "residual"))
run_model(y ~ 0 + log(libsize) + cls + cls:trt + (1 | sam) + (1 | loc), cells, "sim_2comp",
          sim_genes, c("sam", "loc", "residual"))
cat("elapsed", proc.time()[["elapsed"]] - t0, "s\n")

writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("Matrix", packageVersion("Matrix")), paste("minqa", packageVersion("minqa"))),
           file.path(outdir, "versions.txt"))
