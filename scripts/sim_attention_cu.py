# Lane-by-lane NumPy simulation of the loops of lora-kernels/cuda/attention.cu (tiles, causal
# bounds, online softmax, the three backward kernels) against a dense NumPy reference. It checks
# the index logic on a machine with no GPU; it is not a GPU test (cuda_parity.rs is).
#   python3 scripts/sim_attention_cu.py      # prints max |error| per shape (expect ~1e-15)
import numpy as np
TILE=32; WARPS=4; ROWS=2; BR=WARPS*ROWS
def fwd(q,k,v,B,T,Hq,Hkv,D,scale,dout=None):
    out=np.full((B,T,Hq,D),np.nan); lse=np.full((B,Hq,T),np.nan); delta=np.full((B,Hq,T),np.nan)
    lanes=np.arange(32)
    for b in range(B):
     for h in range(Hq):
      g=h//(Hq//Hkv)
      for bx in range((T+BR-1)//BR):
        row0=bx*BR
        qs=np.zeros((BR,D))
        for r in range(BR):
            if row0+r<T: qs[r]=q[b,row0+r,h]
        for warp in range(WARPS):
          m=[-np.inf]*ROWS; l=[0.0]*ROWS; acc=[np.zeros(D) for _ in range(ROWS)]
          last=min(row0+BR,T)
          for j0 in range(0,last,TILE):
            ks=np.zeros((TILE,D)); vs=np.zeros((TILE,D))
            for jj in range(TILE):
                if j0+jj<T: ks[jj]=k[b,j0+jj,g]; vs[jj]=v[b,j0+jj,g]
            for rr in range(ROWS):
                r=warp*ROWS+rr; i=row0+r
                if i>=T or j0>i: continue
                j=j0+lanes
                s=np.where(j<=i, scale*(ks@qs[r]), -np.inf)
                mnew=max(m[rr],s.max())
                p=np.where(j<=i,np.exp(s-mnew),0.0)
                corr=np.exp(m[rr]-mnew)
                l[rr]=l[rr]*corr+p.sum(); m[rr]=mnew
                acc[rr]*=corr
                nj=min(TILE,i-j0+1)
                for jj in range(nj): acc[rr]+=p[jj]*vs[jj]
          for rr in range(ROWS):
            i=row0+warp*ROWS+rr
            if i>=T: continue
            o=acc[rr]/l[rr]
            out[b,i,h]=o; lse[b,h,i]=m[rr]+np.log(l[rr])
            if dout is not None: delta[b,h,i]=(dout[b,i,h]*o).sum()
    return out,lse,delta
def bwd_dq(dq,dout,lse,delta,q,k,v,B,T,Hq,Hkv,D,scale):
    lanes=np.arange(32)
    for b in range(B):
     for h in range(Hq):
      g=h//(Hq//Hkv)
      for bx in range((T+BR-1)//BR):
        row0=bx*BR
        for warp in range(WARPS):
          acc=[np.zeros(D) for _ in range(ROWS)]
          last=min(row0+BR,T)
          for j0 in range(0,last,TILE):
            ks=np.zeros((TILE,D)); vs=np.zeros((TILE,D))
            for jj in range(TILE):
                if j0+jj<T: ks[jj]=k[b,j0+jj,g]; vs[jj]=v[b,j0+jj,g]
            for rr in range(ROWS):
                i=row0+warp*ROWS+rr
                if i>=T or j0>i: continue
                j=j0+lanes
                p=np.exp(scale*(ks@q[b,i,h])-lse[b,h,i]); dp=vs@dout[b,i,h]
                ds=np.where(j<=i,p*(dp-delta[b,h,i]),0.0)
                for jj in range(min(TILE,i-j0+1)): acc[rr]+=ds[jj]*ks[jj]
          for rr in range(ROWS):
            i=row0+warp*ROWS+rr
            if i<T: dq[b,i,h]+=scale*acc[rr]
def bwd_dkv(dk,dv,dout,lse,delta,q,k,v,B,T,Hq,Hkv,D,scale):
    lanes=np.arange(32); rep=Hq//Hkv
    for b in range(B):
     for g in range(Hkv):
      for bx in range((T+BR-1)//BR):
        row0=bx*BR
        for warp in range(WARPS):
          ak=[np.zeros(D) for _ in range(ROWS)]; av=[np.zeros(D) for _ in range(ROWS)]
          for h in range(g*rep,(g+1)*rep):
            for i0 in range((row0//TILE)*TILE,T,TILE):
              qt=np.zeros((TILE,D)); dt=np.zeros((TILE,D))
              for ii in range(TILE):
                  if i0+ii<T: qt[ii]=q[b,i0+ii,h]; dt[ii]=dout[b,i0+ii,h]
              i=i0+lanes
              li=np.array([lse[b,h,x] if x<T else 0 for x in i]); di=np.array([delta[b,h,x] if x<T else 0 for x in i])
              ihi=min(TILE,T-i0)
              for rr in range(ROWS):
                j=row0+warp*ROWS+rr
                if j>=T or i0+ihi-1<j: continue
                valid=(i<T)&(i>=j)
                p=np.where(valid,np.exp(scale*(qt@k[b,j,g])-li),0.0)
                ds=np.where(valid,p*((dt@v[b,j,g])-di),0.0)
                for ii in range(max(0,j-i0),ihi):
                    av[rr]+=p[ii]*dt[ii]; ak[rr]+=ds[ii]*qt[ii]
          for rr in range(ROWS):
            j=row0+warp*ROWS+rr
            if j<T: dk[b,j,g]+=scale*ak[rr]; dv[b,j,g]+=av[rr]
def ref(q,k,v,dout,B,T,Hq,Hkv,D,scale):
    out=np.zeros_like(q); dq=np.zeros_like(q); dk=np.zeros_like(k); dv=np.zeros_like(v)
    for b in range(B):
     for h in range(Hq):
        g=h//(Hq//Hkv)
        S=scale*q[b,:,h]@k[b,:,g].T
        S=np.where(np.tril(np.ones((T,T)))>0,S,-np.inf)
        P=np.exp(S-S.max(1,keepdims=True)); P/=P.sum(1,keepdims=True)
        out[b,:,h]=P@v[b,:,g]
        dP=dout[b,:,h]@v[b,:,g].T
        dS=P*(dP-(P*dP).sum(1,keepdims=True))
        dq[b,:,h]+=scale*dS@k[b,:,g]; dk[b,:,g]+=scale*dS.T@q[b,:,h]; dv[b,:,g]+=P.T@dout[b,:,h]
    return out,dq,dk,dv
rng=np.random.default_rng(0)
for (B,T,Hq,Hkv,D) in [(1,1,1,1,1),(2,5,4,2,8),(1,37,3,1,20),(1,70,4,2,33),(2,41,2,2,7)]:
    q=rng.uniform(-1,1,(B,T,Hq,D)); k=rng.uniform(-1,1,(B,T,Hkv,D)); v=rng.uniform(-1,1,(B,T,Hkv,D)); do=rng.uniform(-1,1,(B,T,Hq,D))
    sc=1/np.sqrt(D)
    out,lse,delta=fwd(q,k,v,B,T,Hq,Hkv,D,sc,do)
    ro,rq,rk,rv=ref(q,k,v,do,B,T,Hq,Hkv,D,sc)
    dq=np.full_like(q,0.5); dk=np.full_like(k,0.5); dv=np.full_like(v,0.5)
    bwd_dq(dq,do,lse,delta,q,k,v,B,T,Hq,Hkv,D,sc); bwd_dkv(dk,dv,do,lse,delta,q,k,v,B,T,Hq,Hkv,D,sc)
    print((B,T,Hq,Hkv,D), np.abs(out-ro).max(), np.abs(dq-0.5-rq).max(), np.abs(dk-0.5-rk).max(), np.abs(dv-0.5-rv).max())
