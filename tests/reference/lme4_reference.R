## Reference fits from lme4 / lmerTest for the simulated data in lme4_sim/cells.csv.
## Run from the repository root:
##   python tests/reference/make_lme4_data.py && Rscript tests/reference/lme4_reference.R
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "common.R"))
outdir <- file.path(here, "lme4_sim")

dat <- read.csv(file.path(outdir, "cells.csv"), stringsAsFactors = FALSE)
dat$sam <- factor(dat$sam)
dat$trt <- factor(dat$trt, levels = c("A", "B"))
dat$cls <- factor(dat$cls, levels = c("c1", "c2", "c3"))
dat$loc <- factor(dat$loc)
genes <- grep("^g[0-9]+$", names(dat), value = TRUE)

fixed_rhs <- "0 + log(libsize) + cls + cls:trt"
models <- list(
  "1comp" = paste("y ~", fixed_rhs, "+ (1 | sam)"),
  "2comp" = paste("y ~", fixed_rhs, "+ (1 | sam) + (1 | loc)")
)

X <- model.matrix(as.formula(paste("~", fixed_rhs)), dat)
terms <- colnames(X)
writeLines(terms, file.path(outdir, "terms.txt"))

## Contrasts
Lmat <- rbind(
  B1vsB2 = setNames(as.numeric(terms == "clsc1:trtB") - as.numeric(terms == "clsc2:trtB"), terms),
  Bavg   = setNames(as.numeric(terms %in% c("clsc1:trtB", "clsc2:trtB", "clsc3:trtB")) / 3, terms)
)
write_ref(data.frame(contrast = rownames(Lmat), Lmat, check.names = FALSE),
          file.path(outdir, "contrasts.csv"))

status <- list()
for (mname in names(models)) {
  for (reml in c(TRUE, FALSE)) {
    meth <- if (reml) "REML" else "ML"
    prefix <- file.path(outdir, sprintf("lme4_%s_%s_", mname, meth))
    res <- list(coef = list(), se = list(), vc = list(), loglik = list(), df = list(),
                contrast = list(), ranef = list(), condvar = list(),
                ranef_loc = list(), condvar_loc = list())
    for (g in genes) {
      dat$y <- dat[[g]]
      form <- as.formula(models[[mname]])
      r <- fit_capture(lme4::lmer(form, data = dat, REML = reml, control = tight_ctrl()))
      fit <- r$fit
      stopifnot(identical(names(fixef(fit)), terms))
      vcdf <- as.data.frame(VarCorr(fit))
      vsam <- vcdf$vcov[vcdf$grp == "sam"]
      vloc <- if (mname == "2comp") vcdf$vcov[vcdf$grp == "loc"] else NULL
      th <- getME(fit, "theta")
      sing <- isSingular(fit, tol = 1e-4)
      res$coef[[g]] <- data.frame(gene = g, t(fixef(fit)), check.names = FALSE)
      res$se[[g]] <- data.frame(gene = g, t(sqrt(diag(as.matrix(vcov(fit))))), check.names = FALSE)
      vrow <- data.frame(gene = g, sam = vsam)
      if (!is.null(vloc)) vrow$loc <- vloc
      vrow$residual <- sigma(fit)^2
      vrow$theta_sam <- unname(th[grep("^sam", names(th))])
      if (!is.null(vloc)) vrow$theta_loc <- unname(th[grep("^loc", names(th))])
      vrow$singular <- as.integer(sing)
      res$vc[[g]] <- vrow
      ll <- logLik(fit)
      crit <- if (reml) REMLcrit(fit) else deviance(fit)
      ## criterion re-evaluated with near-zero theta components snapped to exactly 0
      ## (lme4 stops at theta ~ 1e-5..1e-9 on flat boundary profiles).
      th0 <- th
      th0[getME(fit, "lower") == 0 & abs(th) < 1e-4] <- 0
      crit0 <- crit
      if (any(th0 != th)) {
        dd <- lme4::lmer(form, data = dat, REML = reml, control = tight_ctrl(), devFunOnly = TRUE)
        crit0 <- dd(th0)
      }
      res$loglik[[g]] <- data.frame(
        gene = g, loglik = as.numeric(ll),
        criterion = crit,
        criterion_type = if (reml) "REMLcrit" else "deviance",
        criterion_theta0 = crit0,
        npar = as.integer(attr(ll, "df")), nobs = as.integer(nobs(fit)),
        optimizer_code = as.integer(fit@optinfo$conv$opt),
        feval = as.integer(fit@optinfo$feval),
        messages = conv_messages(fit, r$msgs), stringsAsFactors = FALSE)
      re <- ranef(fit, condVar = TRUE)
      bs <- re$sam[, 1]; names(bs) <- rownames(re$sam)
      res$ranef[[g]] <- data.frame(gene = g, t(bs), check.names = FALSE)
      pv <- attr(re$sam, "postVar")[1, 1, ]; names(pv) <- rownames(re$sam)
      res$condvar[[g]] <- data.frame(gene = g, t(pv), check.names = FALSE)
      if (mname == "2comp") {
        bl <- re$loc[, 1]; names(bl) <- rownames(re$loc)
        res$ranef_loc[[g]] <- data.frame(gene = g, t(bl), check.names = FALSE)
        pl <- attr(re$loc, "postVar")[1, 1, ]; names(pl) <- rownames(re$loc)
        res$condvar_loc[[g]] <- data.frame(gene = g, t(pl), check.names = FALSE)
      }

      ## lmerTest refit (same control): Satterthwaite df and contrasts
      r2 <- fit_capture(lmerTest::lmer(form, data = dat, REML = reml, control = tight_ctrl()))
      fit2 <- r2$fit
      stopifnot(isTRUE(all.equal(fixef(fit2), fixef(fit), tolerance = 1e-10)))
      cf <- summary(fit2, ddf = "Satterthwaite")$coefficients
      res$df[[g]] <- data.frame(gene = g, t(cf[terms, "df"]), check.names = FALSE)
      crow <- data.frame(gene = g)
      for (cn in rownames(Lmat)) {
        ct <- lmerTest::contest1D(fit2, Lmat[cn, ], ddf = "Satterthwaite")
        crow[[paste0(cn, "_estimate")]] <- ct[["Estimate"]]
        crow[[paste0(cn, "_se")]] <- ct[["Std. Error"]]
        crow[[paste0(cn, "_df")]] <- ct[["df"]]
        crow[[paste0(cn, "_t")]] <- ct[["t value"]]
        crow[[paste0(cn, "_p")]] <- ct[["Pr(>|t|)"]]
      }
      res$contrast[[g]] <- crow
      status[[length(status) + 1]] <- data.frame(
        model = mname, method = meth, gene = g, singular = as.integer(sing),
        sam = vsam, loc = if (is.null(vloc)) NA_real_ else vloc,
        messages = conv_messages(fit, r$msgs),
        lmerTest_messages = conv_messages(fit2, r2$msgs), stringsAsFactors = FALSE)
    }
    write_ref(do.call(rbind, res$coef), paste0(prefix, "coef.csv"))
    write_ref(do.call(rbind, res$se), paste0(prefix, "se.csv"))
    write_ref(do.call(rbind, res$vc), paste0(prefix, "vc.csv"))
    write_ref(do.call(rbind, res$loglik), paste0(prefix, "loglik.csv"))
    write_ref(do.call(rbind, res$df), paste0(prefix, "df.csv"))
    write_ref(do.call(rbind, res$contrast), paste0(prefix, "contrast.csv"))
    if (mname == "1comp") {
      write_ref(do.call(rbind, res$ranef), paste0(prefix, "ranef.csv"))
      write_ref(do.call(rbind, res$condvar), paste0(prefix, "condvar.csv"))
    } else {
      write_ref(do.call(rbind, res$ranef), paste0(prefix, "ranef_sam.csv"))
      write_ref(do.call(rbind, res$condvar), paste0(prefix, "condvar_sam.csv"))
      write_ref(do.call(rbind, res$ranef_loc), paste0(prefix, "ranef_loc.csv"))
      write_ref(do.call(rbind, res$condvar_loc), paste0(prefix, "condvar_loc.csv"))
    }
  }
}
st <- do.call(rbind, status)
write_ref(st, file.path(outdir, "fit_status.csv"))
writeLines(c(sprintf("R %s", getRversion()),
             sprintf("lme4 %s", packageVersion("lme4")),
             sprintf("lmerTest %s", packageVersion("lmerTest")),
             sprintf("Matrix %s", packageVersion("Matrix")),
             sprintf("minqa %s", packageVersion("minqa"))),
           file.path(outdir, "versions.txt"))
print(aggregate(singular ~ model + method, data = st, FUN = sum))
print(st[st$messages != "" | st$lmerTest_messages != "", c("model", "method", "gene", "messages", "lmerTest_messages")])
