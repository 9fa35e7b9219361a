# The advpt CLI in a container: `docker run --gpus all advpt pretrain method=mae attack=l2 eps=0.5`
FROM pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/advpt
COPY pyproject.toml README.md ./
COPY advpt ./advpt
COPY conf ./conf
RUN pip install --no-cache-dir . && useradd -m advpt
USER advpt
WORKDIR /work
ENTRYPOINT ["advpt"]
CMD ["pretrain"]
